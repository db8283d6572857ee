"""IFCB raw-bin reader against the real sample bins in tests/data (layouts as pyifcb and ifcb-analysis read them)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pzscale.errors import InputError
from pzscale.readers.ifcb import IFCBReader, bin_time, parse_adc, parse_hdr

V1_BIN = "pyifcb/data/2012/IFCB5_2012_028/IFCB5_2012_028_081515"
V2_2013_BIN = "pyifcb/white/D2013/D201305/D20130526/D20130526T095207_IFCB013"
IRFCB_BIN = "irfcb/test_data/data/D20220522T003051_IFCB134"
CLASSIPYR_BIN = "classipyr/test_data/raw/2022/D20220522/D20220522T000439_IFCB134"
GPS_BIN = "irfcb/test_data/data/D20230810T113059_IFCB134"

# bin -> (schema, number of images, ROI numbers = ADC line numbers, or None to take them from the ADC)
GOOD_BINS = {
    V1_BIN: (1, 6, [1, 2, 3, 4, 5, 6]),
    V2_2013_BIN: (2, 19, None),
    IRFCB_BIN: (2, 2, [2, 3]),
    CLASSIPYR_BIN: (2, 7, [2, 3, 4, 5, 6, 7, 8]),
}

reader = IFCBReader()


def raw_rois(stem: Path, schema: int) -> dict[int, np.ndarray]:
    """ROI number -> pixels, read straight from the .adc/.roi without the reader's code."""
    width_col, height_col, start_col = (11, 12, 13) if schema == 1 else (15, 16, 17)
    roi = (stem.parent / f"{stem.name}.roi").read_bytes()
    images = {}
    for number, line in enumerate((stem.parent / f"{stem.name}.adc").read_text().splitlines(), start=1):
        fields = line.split(",")
        width, height, start = int(fields[width_col]), int(fields[height_col]), int(float(fields[start_col]))
        if width and height:
            images[number] = np.frombuffer(roi, np.uint8, count=width * height, offset=start).reshape(height, width)
    return images


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def stretch(raw: np.ndarray) -> np.ndarray:
    """The min-max stretch of IFCB PNG exports (round half up, not numpy's half-to-even)."""
    low, high = float(raw.min()), float(raw.max())
    return np.floor((raw.astype(np.float64) - low) / (high - low) * 255 + 0.5).astype(np.uint8)


def read_all(path: Path, **plan_args):
    (item,) = reader.plan(str(path), **plan_args)
    return item, reader.read(item, 0, item.rows)


@pytest.mark.parametrize("bin_path", GOOD_BINS)
def test_good_bins_give_raw_pixels_of_every_nonempty_roi(sample_data, bin_path):
    stem = sample_data / bin_path
    schema, count, roi_numbers = GOOD_BINS[bin_path]
    expected = raw_rois(stem, schema)
    item, table = read_all(stem.parent / f"{stem.name}.adc")
    assert (item.error, item.rows, table.num_rows) == ("", count, count)
    assert item.info["schema"] == schema and item.size == sum(
        (stem.parent / f"{stem.name}{ext}").stat().st_size for ext in (".adc", ".hdr", ".roi"))
    assert list(expected) == (roi_numbers or list(expected))
    lid = stem.name
    assert table.column("ObjID").to_pylist() == [f"{lid}_{n:05d}" for n in expected]
    assert table.column("original_path").to_pylist() == [f"/{lid}/{lid}_{n:05d}.png" for n in expected]
    assert set(table.column("dataset").to_pylist()) == {"ifcb"}
    assert set(table.column("original_label").to_pylist()) == {""}
    for image, pixels in zip(table.column("image").to_pylist(), expected.values(), strict=True):
        assert np.array_equal(decode(image["bytes"]), pixels)
    assert table.column("image").to_pylist()[0]["path"] == f"{lid}_{next(iter(expected)):05d}.png"


def test_v1_roi_2_has_the_documented_shape(sample_data):
    _, table = read_all(sample_data / f"{V1_BIN}.hdr")
    assert decode(table.column("image")[1].as_py()["bytes"]).shape == (137, 238)


def test_stretched_pixels_equal_the_shipped_pngs(sample_data):
    pngs = sorted((sample_data / "classipyr/test_data/png/D20220522T000439_IFCB134").glob("*.png"))
    pngs.append(sample_data / "irfcb/test_data/png2/Mesodinium_rubrum/D20220522T003051_IFCB134_00003.png")
    assert len(pngs) == 8 and all(p.exists() for p in pngs)
    by_name = {}
    for bin_path in (CLASSIPYR_BIN, IRFCB_BIN):
        _, table = read_all(sample_data / f"{bin_path}.roi")
        by_name.update({img["path"]: decode(img["bytes"]) for img in table.column("image").to_pylist()})
    for png in pngs:
        assert np.array_equal(stretch(by_name[png.name]), np.asarray(Image.open(png))), png.name


def test_roi_numbers_are_adc_line_numbers_with_zero_size_lines_skipped(sample_data):
    _, table = read_all(sample_data / f"{V2_2013_BIN}.adc")
    lines = (sample_data / f"{V2_2013_BIN}.adc").read_text().splitlines()
    numbers = [int(obj.rsplit("_", 1)[1]) for obj in table.column("ObjID").to_pylist()]
    assert len(lines) == 118 and len(numbers) == 19 and numbers != list(range(1, 20))
    for n in numbers:  # each named line has an image, and every other line has none
        assert int(lines[n - 1].split(",")[15]) > 0
    assert sum(int(line.split(",")[15]) > 0 for line in lines) == 19
    assert all(table.column("ObjID").to_pylist()[i].endswith(f"_{n:05d}") for i, n in enumerate(numbers))


def test_times_come_from_bin_names(sample_data):
    assert bin_time("IFCB5_2012_028_081515").isoformat() == "2012-01-28T08:15:15+00:00"
    assert bin_time("D20130526T095207_IFCB013").isoformat() == "2013-05-26T09:52:07+00:00"
    assert bin_time("IFCB1_2008_366_000000").isoformat() == "2008-12-31T00:00:00+00:00"  # leap year
    with pytest.raises(InputError, match="IFCB1_2009_366_000000"):
        bin_time("IFCB1_2009_366_000000")
    for bin_path, when in ((V1_BIN, "2012-01-28T08:15:15Z"), (V2_2013_BIN, "2013-05-26T09:52:07Z")):
        _, table = read_all(sample_data / f"{bin_path}.adc")
        assert set(table.column("timestamp").to_pylist()) == {when}


def test_volume_analysed(sample_data):
    expected = {V2_2013_BIN: 5.081, CLASSIPYR_BIN: 4.861, IRFCB_BIN: 0.25 * (715.6575 - 0.15215060763888888) / 60,
                V1_BIN: 0.003391470833333334}  # v1: pyifcb's reference value for this bin
    for bin_path, ml in expected.items():
        _, table = read_all(sample_data / f"{bin_path}.adc")
        (value,) = set(table.column("volume_analysed_ml").to_pylist())
        assert value == pytest.approx(ml, rel=1e-3), bin_path


def test_the_sample_is_the_bin(sample_data):
    for bin_path in GOOD_BINS:
        _, table = read_all(sample_data / f"{bin_path}.adc")
        assert set(table.column("sample").to_pylist()) == {bin_path.rsplit("/", 1)[-1]}


@pytest.mark.parametrize("factor, flagged", [(1.0, False), (1.04, False), (10.0, True), (0.5, True)])
def test_a_header_run_time_that_cannot_be_right_is_flagged(sample_data, tmp_path, factor, flagged):
    """The header's run time wins over the ADC's last trigger (the run goes on after it); a header shorter than
    the last trigger, or 10x longer (pyifcb#70), is flagged volume_implausible."""
    stem = copy_bin(sample_data, CLASSIPYR_BIN, tmp_path)
    hdr = Path(f"{stem}.hdr").read_text(encoding="latin-1")
    old = next(line for line in hdr.splitlines() if line.startswith("runTime:"))
    run = float(old.split(":")[1])
    Path(f"{stem}.hdr").write_text(hdr.replace(old, f"runTime: {run * factor:.6f}"), encoding="latin-1")
    _, table = read_all(Path(f"{stem}.adc"))
    assert set(table.column("reader_qc").to_pylist()) == ({"volume_implausible"} if flagged else {""})


def test_real_bins_have_plausible_volumes(sample_data):
    for bin_path in GOOD_BINS:  # the 2013 bin's header runs 4% past its last trigger: normal
        _, table = read_all(sample_data / f"{bin_path}.adc")
        assert set(table.column("reader_qc").to_pylist()) == {""}, bin_path


def test_header_sensors_and_missing_position(sample_data):
    _, table = read_all(sample_data / f"{V1_BIN}.adc")
    row = table.slice(0, 1).to_pylist()[0]
    assert row["Temperature"] == pytest.approx(11.4799732421875)
    assert row["Humidity"] == pytest.approx(32.167437512207)
    assert row["Latitude"] is row["Longitude"] is row["Depth_min"] is row["Depth_max"] is None


def test_gps_position_from_the_v2_header(sample_data):
    items = reader.plan(str(sample_data / f"{GPS_BIN}.adc"))
    assert [i.error for i in items] == [f"{sample_data / GPS_BIN}: no .roi file (partial bin)"]
    hdr = parse_hdr((sample_data / f"{GPS_BIN}.hdr").read_text())
    assert (float(hdr["gpsLatitude"]), float(hdr["gpsLongitude"])) == (58.25983722, 11.43537362)
    assert hdr["gpsTimeFromFix"] == "Jul/17/2022 16:17:39.00 UTC"
    adc = parse_adc((sample_data / f"{GPS_BIN}.adc").read_text(), 2)
    assert len(adc["width"]) == 45 and int(((adc["width"] > 0) & (adc["height"] > 0)).sum()) == 33  # roiCount


def test_gps_position_reaches_the_records(sample_data, tmp_path):
    # the GPS bin has no .roi: pair its header with the 2022 bin of the same instrument to read it
    stem = tmp_path / "D20220522T003051_IFCB134"
    for ext in (".adc", ".roi"):
        shutil.copy(sample_data / f"{IRFCB_BIN}{ext}", f"{stem}{ext}")
    shutil.copy(sample_data / f"{GPS_BIN}.hdr", f"{stem}.hdr")
    _, table = read_all(tmp_path)
    assert set(table.column("Latitude").to_pylist()) == {58.25983722}
    assert set(table.column("Longitude").to_pylist()) == {11.43537362}


def test_pyifcb_tree_reports_every_bad_bin_and_ignores_the_decoy(sample_data):
    root = sample_data / "pyifcb"
    items = reader.plan(str(root), source="whoi_test")
    found = [(Path(i.source).relative_to(root).as_posix(), i.rows, i.error.removeprefix(f"{i.source}: "))
             for i in items]
    assert found == [
        ("invalid/D20130101T101010_IFCB099", 0, "all files are empty"),
        ("white/D2013/D201305/D20130526/D20130526T095207_IFCB013", 19, ""),
        ("empty/D20150411T205456_IFCB012", 0, "header-only bin (.adc and .roi are empty)"),
        ("data/skip/IFCB5_2006_001_121212", 0, "all files are empty"),
        ("data/2012/IFCB5_2012_028/IFCB5_2012_028_081515", 6, ""),
        ("partial/IFCB5_2012_028_081515", 0, "no .roi file (partial bin)"),
        ("empty/IFCB5_2017_001_033645", 0, "empty .adc (no triggers)"),
    ]
    for item in items:
        assert item.info["source"] == "whoi_test"
        if item.error:
            assert "\n" not in item.error and item.error.startswith(f"{item.source}: ")


def test_every_sample_header_parses(sample_data):
    headers = sorted(sample_data.glob("**/*.hdr"))
    assert len(headers) == 17
    parsed = {h.name: parse_hdr(h.read_text(encoding="latin-1")) for h in headers}
    # v1 layouts: 6, 5 and 3 value columns, and the oldest with names but no values
    assert parsed["IFCB1_2006_237_000054.hdr"]["BlobSizeThresh"] == "10"
    assert parsed["IFCB1_2006_214_150922.hdr"]["PMT2hv(chl)"] == ".75"
    assert parsed["IFCB1_2006_188_200152.hdr"] == {
        "softwareVersion": "Imaging FlowCytobot Acquisition Software version 1.0; October 2005",
        "SyringeStatus": "127", "Temp": "20.928611328125", "Humidity": "16.9670373535156", "BinarizeThresh": "40"}
    assert "Temp" not in parsed["IFCB1_2006_157_181359.hdr"]
    # v2: trailing tabs stripped, lines without a colon skipped, both key spellings
    v2_2013 = parsed["D20130526T095207_IFCB013.hdr"]
    assert (v2_2013["runTime"], v2_2013["inhibitTime"], v2_2013["imagerID"]) == ("1231.024861", "11.622980", "13")
    assert v2_2013["sampleTime"] == "2013-05-26T09:52:07Z" and "softwareVersion" in v2_2013
    assert not any(" " in key and "firmware" in key for key in v2_2013)
    assert parsed["D20220522T003051_IFCB134.hdr"]["SoftwareVersion"] == "2.0.0.0"
    assert parsed["D20220522T000439_IFCB134.hdr"]["ADCFileFormat"].startswith("trigger#, ADCtime,")
    assert parsed["D20130101T101010_IFCB099.hdr"] == {}  # 0-byte file


def test_v1_adc_with_scientific_notation(sample_data):
    text = (sample_data / "ifcb-analysis/exampleData/IFCB1_2009_216/IFCB1_2009_216_075913.adc").read_text()
    adc = parse_adc(text, 1)
    assert len(adc["trigger"]) == 268
    assert adc["frame_grab_time"][0] == pytest.approx(1.953125e-02)
    assert (adc["width"][0], adc["height"][0], adc["start_byte"][0]) == (130, 78, 1)


def test_v2_missing_values_become_nan(sample_data):
    adc = parse_adc((sample_data / f"{V2_2013_BIN}.adc").read_text(), 2)
    assert len(adc["trigger"]) == 118 and adc["run_time"][-1] == pytest.approx(1184.037103)
    bad = "1," + ",".join(["-999.00000"] * 23)
    assert np.isnan(parse_adc(bad, 2)["inhibit_time"][0])


def test_read_a_sub_range(sample_data):
    (item,) = reader.plan(str(sample_data / f"{V2_2013_BIN}.adc"))
    whole = reader.read(item, 0, item.rows)
    part = reader.read(item, 5, 12)
    assert part.num_rows == 7
    assert part.column("ObjID").to_pylist() == whole.column("ObjID").to_pylist()[5:12]
    assert part.column("image").to_pylist() == whole.column("image").to_pylist()[5:12]
    assert reader.read(item, 3, 3).num_rows == 0
    with pytest.raises(InputError, match="out of range"):
        reader.read(item, 0, item.rows + 1)


def test_malformed_bins_become_item_errors(sample_data, tmp_path):
    good = sample_data / V1_BIN
    stem = tmp_path / "bad_adc" / good.name
    stem.parent.mkdir()
    for ext in (".adc", ".hdr", ".roi"):
        shutil.copy(good.parent / f"{good.name}{ext}", f"{stem}{ext}")
    Path(f"{stem}.adc").write_text("1,2,3\n")
    (bad,) = reader.plan(str(tmp_path))
    assert bad.rows == 0
    assert bad.error == f"{tmp_path}/bad_adc/{good.name}.adc: line 1 has 3 values, schema 1 has 15"
    with pytest.raises(InputError, match="line 2 has a non-numeric value 'x'"):
        parse_adc("1" + ",0" * 14 + ",\n2" + ",0" * 13 + ",x,\n", 1, name="f.adc")


def copy_bin(sample_data: Path, bin_path: str, folder: Path) -> Path:
    """A real sample bin copied into ``folder``, to be edited there; its stem."""
    stem = folder / Path(bin_path).name
    folder.mkdir(parents=True, exist_ok=True)
    for ext in (".adc", ".hdr", ".roi"):
        if (sample_data / f"{bin_path}{ext}").exists():
            shutil.copy(sample_data / f"{bin_path}{ext}", f"{stem}{ext}")
    return stem


def edit_adc(stem: Path, line: int, column: int, value: str) -> None:
    lines = Path(f"{stem}.adc").read_text().splitlines()
    fields = lines[line - 1].split(",")
    fields[column] = value
    lines[line - 1] = ",".join(fields)
    Path(f"{stem}.adc").write_text("\n".join(lines) + "\n")


# CLASSIPYR_BIN's ROI 4 (ADC line 4: width 136, height 90, start byte 27520), made uncuttable in one way each
ROI_PROBLEMS = {
    "fractional width": (15, "0.5", "width 0.5 is not a whole number of pixels"),
    "width rounding to 0": (15, "0.4", "width 0.4 is not a whole number of pixels"),
    "negative height": (16, "-7", "height -7 is negative"),
    "missing width": (15, "-999", "width is missing (-999 or NaN)"),
    "nan height": (16, "nan", "height is missing (-999 or NaN)"),
    "infinite width": (15, "inf", "width inf is not a whole number of pixels"),
    "fractional start byte": (17, "100.5", "start byte 100.5 is not a byte offset"),
    "negative start byte": (17, "-3", "start byte -3 is not a byte offset"),
}


@pytest.mark.parametrize("problem", ROI_PROBLEMS)
def test_a_roi_that_cannot_be_cut_is_a_row_with_the_reason(sample_data, tmp_path, problem):
    column, value, error = ROI_PROBLEMS[problem]
    stem = copy_bin(sample_data, CLASSIPYR_BIN, tmp_path)
    good = raw_rois(stem, 2)
    edit_adc(stem, 4, column, value)
    (item,) = reader.plan(str(tmp_path))
    assert (item.error, item.rows, item.notes) == ("", 7, [])  # the header's roiCount 7 counts that ROI too
    table = reader.read(item, 0, item.rows)
    assert table.num_rows == 7
    images = table.column("image").to_pylist()
    assert [bool(i["bytes"]) for i in images] == [True, True, False, True, True, True, True]  # ROIs 2..8
    assert table.column("image_error").to_pylist()[2] == f"{stem.name}.adc roi 4: {error}"
    assert table.column("ObjID").to_pylist() == [f"{stem.name}_{n:05d}" for n in range(2, 9)]
    for image, number in zip(images, range(2, 9), strict=True):
        if number != 4:
            assert np.array_equal(decode(image["bytes"]), good[number])
    # read in parts (as shards do), the rows are the same
    parts = [reader.read(item, a, b) for a, b in ((0, 2), (2, 3), (3, 7))]
    assert sum((p.column("image").to_pylist() for p in parts), []) == images


def test_roi_bytes_beyond_the_end_of_the_roi_file(sample_data, tmp_path):
    # a .roi cut short (a copy still in progress): the ROIs it holds are read, the ones beyond its end are rows
    # without image bytes, each saying which bytes it needs
    stem = copy_bin(sample_data, V1_BIN, tmp_path)
    good = raw_rois(stem, 1)
    Path(f"{stem}.roi").write_bytes(Path(f"{stem}.roi").read_bytes()[:60000])
    (item,) = reader.plan(str(stem) + ".roi")
    assert (item.error, item.rows) == ("", 6)
    table = reader.read(item, 0, item.rows)
    images, errors = table.column("image").to_pylist(), table.column("image_error").to_pylist()
    assert [bool(i["bytes"]) for i in images] == [True, True, True, True, False, False]
    for image, number in zip(images[:4], range(1, 5), strict=True):
        assert np.array_equal(decode(image["bytes"]), good[number])
    assert errors[4] == f"{stem.name}.adc roi 5: bytes 57492..62217 are beyond the end of {stem.name}.roi (60000 bytes)"
    assert errors[5].startswith(f"{stem.name}.adc roi 6: bytes ") and errors[5].endswith("(60000 bytes)")
    assert reader.read(item, 4, 6).column("image_error").to_pylist() == errors[4:]


def test_a_roi_far_beyond_the_end_reads_no_more_than_the_file(sample_data, tmp_path):
    stem = copy_bin(sample_data, CLASSIPYR_BIN, tmp_path)
    edit_adc(stem, 8, 17, "1e18")  # a read of up to that byte would not fit in memory
    (item,) = reader.plan(str(tmp_path))
    table = reader.read(item, 0, item.rows)
    assert table.num_rows == 7 and table.column("image").to_pylist()[-1]["bytes"] == b""
    assert table.column("image_error").to_pylist()[-1].startswith(f"{stem.name}.adc roi 8: bytes 1000000000000000000..")


@pytest.mark.cluster
def test_ingest_of_a_bin_with_a_fractional_roi_width(sample_data, tmp_path, client):
    from pzscale import open_catalog
    from pzscale.ingest import ingest

    folder = tmp_path / "bins"
    stem = copy_bin(sample_data, CLASSIPYR_BIN, folder)
    edit_adc(stem, 4, 15, "0.5")
    url = str(tmp_path / "cat.zarr")
    report = ingest([str(folder)], url, format="ifcb", source="s", shard_len=4, client=client, progress=False)
    assert (report.failures, report.input_errors, report.input_notes) == ([], [], [])
    assert report.status == {"ok": 6, "missing_image": 1}
    ds = open_catalog(url).drop_vars("image_bytes").compute()
    assert list(ds["image_id"].values) == [f"s:{stem.name}_{n:05d}" for n in range(2, 9)]
    assert list(ds["status"].values) == ["ok", "ok", "missing_image", "ok", "ok", "ok", "ok"]
    assert ds["error"].values[2] == f"{stem.name}.adc roi 4: width 0.5 is not a whole number of pixels"


def test_header_roi_count_that_disagrees_with_the_adc_is_a_note(sample_data, tmp_path):
    stem = copy_bin(sample_data, CLASSIPYR_BIN, tmp_path)
    hdr = Path(f"{stem}.hdr").read_text(encoding="latin-1")
    assert hdr.count("roiCount: 7") == 1
    Path(f"{stem}.hdr").write_text(hdr.replace("roiCount: 7", "roiCount: 9"), encoding="latin-1")
    (item,) = reader.plan(str(tmp_path))
    assert item.notes == [f"{stem}: header roiCount 9 but {stem.name}.adc has 7 ROIs (lines with a non-zero width "
                          "and height); the .adc is read"]
    assert (item.error, item.rows, reader.read(item, 0, item.rows).num_rows) == ("", 7, 7)  # the ADC is read


def test_real_sample_bins_have_no_notes(sample_data, tmp_path):
    # roiCount counts ADC lines with an image, not lines or triggers: 2 of 3, 7 of 8 lines, and in the 2023 bin
    # 33 of 45 lines with 41 triggers (it has no .roi: give it one, the plan does not read it)
    items = [i for root in ("pyifcb", "irfcb/test_data/data", "classipyr/test_data/raw")
             for i in reader.plan(str(sample_data / root))]
    stem = copy_bin(sample_data, GPS_BIN, tmp_path)
    Path(f"{stem}.roi").write_bytes(b"\0")
    items += reader.plan(str(tmp_path))
    assert [i.rows for i in items if not i.error] == [19, 6, 2, 7, 33]
    assert [i.notes for i in items] == [[]] * len(items)


def test_inputs_without_bins_raise(sample_data):
    with pytest.raises(InputError, match="no such file or folder"):
        reader.plan(str(sample_data / "pyifcb/nowhere"))
    with pytest.raises(InputError, match="no IFCB bins found"):
        reader.plan(str(sample_data / "ecotaxa_back"))
    with pytest.raises(InputError, match="not an IFCB bin file"):
        reader.plan(str(sample_data / "pyifcb/SOURCE.txt"))


def test_guess_can_open(sample_data, tmp_path):
    assert reader.guess_can_open(str(sample_data / "pyifcb"))
    assert reader.guess_can_open(str(sample_data / f"{V1_BIN}.adc"))
    assert not reader.guess_can_open(str(sample_data / "ecotaxa_back"))
    (tmp_path / "notes.txt").write_text("IFCB5_2012_028_081515")
    assert not reader.guess_can_open(str(tmp_path / "notes.txt"))
    assert not reader.guess_can_open(str(tmp_path))


def test_read_keys_are_the_keys_of_the_rows_without_reading_the_roi(sample_data, tmp_path):
    from pzscale.readers.base import keys_only

    stem = copy_bin(sample_data, CLASSIPYR_BIN, tmp_path / "edited")
    edit_adc(stem, 4, 15, "0.5")
    items = reader.plan(str(sample_data / "pyifcb")) + reader.plan(str(tmp_path))
    for item in (i for i in items if not i.error):
        assert reader.read_keys(item).equals(keys_only(reader.read(item, 0, item.rows))), item.source
    Path(f"{stem}.roi").unlink()  # the ids come from the .adc alone
    assert reader.read_keys(items[-1]).column("ObjID").to_pylist() == [f"{stem.name}_{n:05d}" for n in range(2, 9)]
