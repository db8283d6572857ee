"""EcoTaxa reader against the real sample TSVs (ecotaxa_back, iRfcb, ZooProcess-lib) and small made-up cases."""

from __future__ import annotations

import csv
import io
import shutil
import zipfile
from pathlib import Path

import pytest

from pzscale.errors import InputError
from pzscale.readers import ecotaxa
from pzscale.readers.ecotaxa import EcoTaxaReader, parse_coordinate, parse_time, read_table

READER = EcoTaxaReader()
SAMPLE_TSVS = [
    "ecotaxa_back/import_test/m106_mn01_n1_sml/ecotaxa_m106_mn01_n1_sml.tsv",
    "ecotaxa_back/import_test/m106_mn01_n2_sml/ecotaxa_m106_mn01_n2_sml.tsv",
    "ecotaxa_back/import_uvp6_zip_in_dir/b_da_19_Images/ecotaxa_b_da_19.tsv",
    "ecotaxa_back/import_sparse/ecotaxa_20160719B-163000ish-HealyVPR08-2016_d200_h18_roi.tsv",
    "irfcb/exdata/ecotaxa_table_minimum.tsv",
    "irfcb/exdata/ecotaxa_table_with_classification.tsv",
    "irfcb/exdata/ecotaxa_table_without_classification.tsv",
    "irfcb/exdata/example_table_ifcb.tsv",
    "zooprocess-lib/data/features/ecotaxa_13892_13563.tsv",
    "zooprocess-lib/data/features/ecotaxa_2855_223.tsv",
]
UVP6 = "ecotaxa_back/import_uvp6_zip_in_dir"
M106 = "ecotaxa_back/import_test"


def csv_rows(path: Path) -> list[dict[str, str]]:
    """Data rows of a TSV counted independently of the reader: csv module, no pandas."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("iso-8859-1")
    rows = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter="\t") if r]
    header, body = rows[0], rows[1:]
    if body and all(c.startswith("[") for c in body[0] if c):
        body = body[1:]
    return [dict(zip(header, r, strict=False)) for r in body]


def read_all(path: Path | str, **kw) -> list[dict]:
    rows = []
    for item in READER.plan(str(path), **kw):
        assert not item.error, item.error
        rows.extend(READER.read(item, 0, item.rows).to_pylist())
    return rows


@pytest.mark.parametrize("name", SAMPLE_TSVS)
def test_every_sample_tsv_plans_exact_rows_and_reads_them(sample_data, name):
    path = sample_data / name
    expected = csv_rows(path)
    [item] = READER.plan(str(path))
    assert item.error == "" and item.rows == len(expected) and item.size == path.stat().st_size
    rows = READER.read(item, 0, item.rows).to_pylist()
    ids = [e["object_id"] for e in expected]
    # an object with several images gets one id per image: object id / image file name
    assert [r["ObjID"] for r in rows] == [
        f"{i}/{e['img_file_name']}" if ids.count(i) > 1 and i else i for i, e in zip(ids, expected, strict=True)]
    assert [r["original_path"] for r in rows] == [r["image"]["path"] for r in rows]
    assert [r["original_path"] for r in rows] == [e["img_file_name"] for e in expected]
    assert [r["original_label"] for r in rows] == [e.get("object_annotation_category", "") for e in expected]
    for r, e in zip(rows, expected, strict=True):
        if "object_lat" in e and "°" not in e["object_lat"]:
            assert r["Latitude"] == pytest.approx(float(e["object_lat"]))
            assert r["Longitude"] == pytest.approx(float(e["object_lon"]))
        on_disk = path.parent / e["img_file_name"]
        assert r["image"]["bytes"] == (on_disk.read_bytes() if on_disk.is_file() else None)


def test_slices_read_the_same_rows_as_one_read(sample_data):
    [item] = READER.plan(str(sample_data / SAMPLE_TSVS[0]))
    whole = READER.read(item, 0, item.rows).to_pylist()
    for first in range(item.rows):
        for stop in range(first + 1, item.rows + 1):
            assert READER.read(item, first, stop).to_pylist() == whole[first:stop]


@pytest.mark.parametrize("name", [SAMPLE_TSVS[0], SAMPLE_TSVS[7], f"{UVP6}/b_da_19_Images.zip"])
def test_recorded_row_offsets_give_the_same_slices(sample_data, monkeypatch, name):
    [plain] = READER.plan(str(sample_data / name))
    whole = READER.read(plain, 0, plain.rows).to_pylist()
    monkeypatch.setattr(ecotaxa, "CHECKPOINT", 2)  # a seek every 2 rows instead of every 10,000
    [item] = READER.plan(str(sample_data / name))
    assert len(item.info["offsets"]) == (item.rows + 1) // 2 and item.info["offset_every"] == 2
    for first in range(item.rows):
        for stop in range(first + 1, item.rows + 1):
            assert READER.read(item, first, stop).to_pylist() == whole[first:stop]


def test_m106_zooscan_images_labels_and_shared_image_rows(sample_data):
    rows = read_all(sample_data / M106)
    assert len(rows) == 8 + 3
    for r in rows:
        jpeg = next((sample_data / M106).rglob(r["original_path"]))
        assert r["image"]["bytes"] == jpeg.read_bytes()  # the JPEG itself, not re-encoded
    labels = {r["original_label"] for r in rows}
    assert {"Oncaeidae", "Cyclopoida", "detritus", "egg<other", "other<Biota", "t001"} <= labels
    # the QA file points four objects at one image: every row is kept, each with that image
    shared = [r for r in rows if r["original_path"] == "m106_mn01_n1_sml_850.jpg"]
    assert [r["ObjID"] for r in shared] == [f"m106_mn01_n1_sml_{n}" for n in (850, 852, 853, 854)]
    first = rows[0]
    assert first["ObjID"] == "m106_mn01_n1_sml_409"
    assert first["Latitude"] == pytest.approx(-44.72543333333333) and first["Longitude"] == pytest.approx(145.5351)
    assert (first["Depth_min"], first["Depth_max"]) == (600.0, 1000.0)
    assert first["timestamp"] == "2014-04-20T00:04:20Z"  # object_time "420": leading zeros dropped upstream
    assert first["annotation_status"] == "predicted"
    assert first["dataset"] == "ecotaxa_epson"  # acq_instrument is the scanner ("epson") in these files


def test_the_sample_is_sample_id_else_the_acquisition(sample_data, tmp_path):
    samples = {name: {r["sample"] for r in read_all(sample_data / name)} for name in SAMPLE_TSVS}
    assert samples[SAMPLE_TSVS[0]] == {"m106_mn01_n1_sml"}  # a ZooScan net sample
    assert samples["irfcb/exdata/example_table_ifcb.tsv"] == {"RV_FB_D20230915T093804_IFCB134",
                                                                "RV_FB_D20230915T113552_IFCB134"}  # IFCB bins
    assert samples["zooprocess-lib/data/features/ecotaxa_2855_223.tsv"] == {"apero2023_tha_bioness_013_st46_d_n4"}
    assert samples[SAMPLE_TSVS[3]] == {""}  # the VPR table has neither sample_id nor acq_id: unknown
    # a table with acquisitions only: the acquisition is the sample
    source = sample_data / SAMPLE_TSVS[0]
    lines = source.read_text().split("\n")
    header = lines[0].split("\t")
    assert "sample_id" in header and "acq_id" in header
    lines[0] = "\t".join("sample_other" if c == "sample_id" else c for c in header)
    copy = tmp_path / source.parent.name / source.name
    shutil.copytree(source.parent, copy.parent)
    copy.write_text("\n".join(lines))
    expected = {r["acq_id"] for r in csv_rows(source)}
    assert expected and expected != {""} and {r["sample"] for r in read_all(copy)} == expected


def test_zooscan_volume_is_the_net_volume_over_the_part_scanned(sample_data):
    rows = read_all(sample_data / "zooprocess-lib/data/features/ecotaxa_2855_223.tsv")
    # sample_tot_vol 203.5 m3 filtered, acq_sub_part 4 (a quarter scanned, Motoda splitter)
    assert [r["volume_analysed_ml"] for r in rows] == pytest.approx([203.5e6 / 4] * len(rows)) and rows
    # the m106 scans name the scanner (epson), not ZooScan, and have no net volume: unknown
    assert {r.get("volume_analysed_ml") for r in read_all(sample_data / SAMPLE_TSVS[0])} == {None}


def test_uvp6_latin1_degree_coordinates(sample_data):
    tsv = sample_data / UVP6 / "b_da_19_Images" / "ecotaxa_b_da_19.tsv"
    assert b"\t43\xb00 0\t17\xb00 0\t" in tsv.read_bytes()  # Latin-1 degree sign: 43°0'0" N, 17°0'0" E
    [item] = READER.plan(str(tsv))
    assert item.info["encoding"] == "iso-8859-1" and item.info["source"] == "ecotaxa_uvp6"
    rows = READER.read(item, 0, item.rows).to_pylist()
    assert len(rows) == 15
    assert {(r["Latitude"], r["Longitude"]) for r in rows} == {(43.0, 17.0)}
    assert {r["pixel_size_um"] for r in rows} == {73.0}
    assert rows[0]["timestamp"] == "2020-02-05T11:18:23Z"
    assert rows[0]["Depth_min"] == pytest.approx(194.63)
    for r in rows:  # images sit in sub-folders sub1/ and sub2/
        assert r["image"]["bytes"] == (tsv.parent / r["original_path"]).read_bytes()
    assert {r["original_path"].split("/")[0] for r in rows} == {"sub1", "sub2"}


def test_uvp6_zip_is_read_in_place(sample_data):
    archive = sample_data / UVP6 / "b_da_19_Images.zip"
    [item] = READER.plan(str(archive))
    assert item.info["member"] == "b_da_19_Images/ecotaxa_b_da_19.tsv" and item.rows == 15
    from_zip = READER.read(item, 0, item.rows)
    [folder_item] = READER.plan(str(sample_data / UVP6 / "b_da_19_Images"))
    assert from_zip.equals(READER.read(folder_item, 0, folder_item.rows))
    assert READER.read(item, 3, 7).to_pylist() == from_zip.to_pylist()[3:7]


def test_zip_built_from_a_folder_gives_the_same_records(sample_data, tmp_path):
    folder = sample_data / M106 / "m106_mn01_n1_sml"
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"export/m106_mn01_n1_sml/{f.name}")  # the TSV sits in a sub-folder of the zip
    assert READER.guess_can_open(str(archive))
    [item] = READER.plan(str(archive))
    assert item.info["member"] == "export/m106_mn01_n1_sml/ecotaxa_m106_mn01_n1_sml.tsv"
    [folder_item] = READER.plan(str(folder))
    assert READER.read(item, 0, item.rows).equals(READER.read(folder_item, 0, folder_item.rows))


def test_latin1_zooscan_table_and_multi_image_objects(sample_data):
    tsv = sample_data / "irfcb/exdata/ecotaxa_table_without_classification.tsv"
    with tsv.open("rb") as fh:
        table = read_table(fh, "iso-8859-1", type_row=True, columns=set())
    assert "process_particle_pixel_size_µm" in table.columns  # byte 0xB5 decoded as µ
    [item] = READER.plan(str(tsv))
    assert item.info["encoding"] == "iso-8859-1" and item.info["source"] == "ecotaxa_zooscan"
    rows = READER.read(item, 0, item.rows).to_pylist()
    # one object, three images (img_rank 0, 1, 2): one row each, and each keeps its own id
    names = [f"bongo_3_180_20150711_d2_1_1{s}.jpg" for s in ("", "b", "c")]
    assert [r["original_path"] for r in rows[:3]] == names
    assert [r["ObjID"] for r in rows[:3]] == [f"bongo_3_180_20150711_d2_1_1/{n}" for n in names]
    assert {r["instrument"] for r in rows} == {"ZooScan"}


def test_vpr_set(sample_data):
    folder = sample_data / "ecotaxa_back/import_sparse"
    rows = read_all(folder)
    assert len(rows) == 6
    assert {(r["Latitude"], r["Longitude"]) for r in rows} == {(77.0709, 161.8121)}  # sign kept as in the file
    assert rows[0]["timestamp"] == "2016-07-19T02:01:39.315Z"
    assert rows[0]["dataset"] == "ecotaxa_vpr"
    assert all(r["image"]["bytes"] == (folder / r["original_path"]).read_bytes() for r in rows)


def test_crlf_ifcb_table(sample_data):
    rows = read_all(sample_data / "irfcb/exdata/example_table_ifcb.tsv")
    assert len(rows) == 2
    first = rows[0]
    assert first["original_label"] == "Amphidinium-like" and first["aphia_ID"] == "109473"
    assert first["original_hierarchy"] == "Amphidinium" and first["annotation_status"] == "validated"
    assert first["Latitude"] == pytest.approx(57.7281986) and first["Longitude"] == pytest.approx(11.46815443)
    assert first["timestamp"] == "2023-09-15T09:38:04Z" and first["dataset"] == "ecotaxa_ifcb"
    assert not any("\r" in str(v) for r in rows for v in r.values())


def test_missing_image_leaves_that_row_without_bytes(sample_data, tmp_path):
    folder = tmp_path / "n2"
    shutil.copytree(sample_data / M106 / "m106_mn01_n2_sml", folder)
    (folder / "m106_mn01_n2_sml_1081.jpg").unlink()
    rows = read_all(folder)
    assert [r["image"]["bytes"] is None for r in rows] == [False, True, False]
    assert rows[1]["ObjID"] == "m106_mn01_n2_sml_1081" and rows[1]["original_label"] == "detritus"
    assert rows[2]["image"]["bytes"] == (folder / "m106_mn01_n2_sml_1111.jpg").read_bytes()


def test_folder_plan_is_sorted_and_includes_zips(sample_data):
    items = READER.plan(str(sample_data / "ecotaxa_back"))
    assert [it.rows for it in items] == [6, 8, 3, 15, 15]
    assert [(it.info["container"], it.info["member"]) for it in items] == sorted(
        (it.info["container"], it.info["member"]) for it in items
    )
    assert items[3].info["member"] and not items[4].info["member"]  # the zip, then its unzipped copy


def test_given_source_wins(sample_data):
    [item] = READER.plan(str(sample_data / SAMPLE_TSVS[2]), source="my_uvp")
    assert item.info["source"] == "my_uvp"
    assert {r["dataset"] for r in READER.read(item, 0, 2).to_pylist()} == {"my_uvp"}


def test_default_source_without_instrument(sample_data):
    [item] = READER.plan(str(sample_data / "irfcb/exdata/ecotaxa_table_minimum.tsv"))
    assert item.info["source"] == "ecotaxa"


def test_blank_lines_do_not_shift_rows(tmp_path):
    tsv = tmp_path / "ecotaxa_blank.tsv"
    lines = ["img_file_name\tobject_id\tobject_lat", "[t]\t[t]\t[f]", "a.png\ta\t1", "", "b.png\tb\t2",
             "\t\t", "", "", "c.png\t\"c\nc\"\t3", "d.png\td", "e.png\te\t5", "", ""]
    tsv.write_text("\n".join(lines) + "\n")
    (tmp_path / "a.png").write_bytes(b"A")
    [item] = READER.plan(str(tsv))
    assert item.rows == len(csv_rows(tsv)) == 6
    assert item.info["offsets"] == []  # quotes and blank lines: rows are not lines, no seeking
    whole = READER.read(item, 0, item.rows).to_pylist()
    assert [r["ObjID"] for r in whole] == ["a", "b", "", "c\nc", "d", "e"]
    assert [r["Latitude"] for r in whole] == [1.0, 2.0, None, 3.0, None, 5.0]
    assert whole[0]["image"]["bytes"] == b"A" and whole[1]["image"]["bytes"] is None
    for first in range(item.rows):
        for stop in range(first + 1, item.rows + 1):
            assert READER.read(item, first, stop).to_pylist() == whole[first:stop]


def test_extra_trailing_cells_do_not_shift_columns(tmp_path):
    tsv = tmp_path / "trailing.tsv"
    tsv.write_text("img_file_name\tobject_id\tobject_lat\n[t]\t[t]\t[f]\t\nx.png\tx\t1\t\ny.png\ty\t2\textra\n")
    [item] = READER.plan(str(tsv))
    rows = READER.read(item, 0, item.rows).to_pylist()
    assert [(r["original_path"], r["ObjID"], r["Latitude"]) for r in rows] == [("x.png", "x", 1.0), ("y.png", "y", 2.0)]
    assert READER.read(item, 1, 2).to_pylist() == rows[1:]


def test_table_without_type_row(tmp_path):
    tsv = tmp_path / "plain.tsv"
    tsv.write_text("object_id\timg_file_name\tobject_date\nx\tx.jpg\t20200101\ny\ty.jpg\t\n")
    [item] = READER.plan(str(tsv))
    assert item.rows == 2 and item.info["type_row"] is False
    rows = READER.read(item, 0, 2).to_pylist()
    assert [r["timestamp"] for r in rows] == ["2020-01-01T00:00:00Z", None]


def test_bad_tables_are_reported_per_item(tmp_path):
    (tmp_path / "a_no_images.tsv").write_text("object_id\tobject_lat\nx\t1\n")
    (tmp_path / "b_good.tsv").write_text("img_file_name\tobject_id\nx.png\tx\n")
    (tmp_path / "c_other.tsv").write_text("name\tvalue\nx\t1\n")  # not EcoTaxa: skipped
    (tmp_path / "d_broken.zip").write_bytes(b"PK not really a zip")
    (tmp_path / "e_unclosed_quote.tsv").write_text('img_file_name\tobject_id\nx.png\t"x\ny.png\ty\n')
    items = READER.plan(str(tmp_path))
    names = [Path(it.info["container"]).name for it in items]
    assert names == ["a_no_images.tsv", "b_good.tsv", "d_broken.zip", "e_unclosed_quote.tsv"]
    errors = [it.error for it in items]
    assert "no img_file_name column" in errors[0] and errors[1] == "" and "zip" in errors[2] and errors[3]
    assert all("\n" not in e and (e == "" or e.startswith(str(tmp_path))) for e in errors)
    assert [it.rows for it in items] == [0, 1, 0, 0]


def test_nothing_ecotaxa_like_raises(sample_data, tmp_path):
    (tmp_path / "other.tsv").write_text("name\tvalue\nx\t1\n")
    with pytest.raises(InputError, match="no EcoTaxa TSV"):
        READER.plan(str(tmp_path))
    with pytest.raises(InputError, match="no such file"):
        READER.plan(str(tmp_path / "missing"))
    with pytest.raises(InputError):
        READER.plan(str(sample_data / "pyifcb"))


def test_guess_can_open(sample_data, tmp_path):
    for name in ["ecotaxa_back", M106, UVP6, f"{UVP6}/b_da_19_Images.zip", "ecotaxa_back/import_sparse",
                 "irfcb/exdata", "zooprocess-lib/data/features", *SAMPLE_TSVS]:
        assert READER.guess_can_open(str(sample_data / name)), name
    (tmp_path / "other.tsv").write_text("name\tvalue\nx\t1\n")
    for path in [sample_data / "pyifcb", tmp_path, tmp_path / "other.tsv", tmp_path / "missing.tsv"]:
        assert not READER.guess_can_open(str(path)), path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("43.5", 43.5),
        ("-12.25", -12.25),
        ("43°30", 43.5),
        ("43°30.5", 43 + 30.5 / 60),
        ("43°0 0", 43.0),
        ("43°30 36", 43 + 30.6 / 60),  # EcoTaxa's UVP form: degrees°minutes seconds
        ("-12°15.25'", -(12 + 15.25 / 60)),
        ("12°15'S", -12.25),
        ("12°15'N", 12.25),
        ("5°30'W", -5.5),
        ("43Â°30", 43.5),  # UTF-8 degree sign read as Latin-1
        ("161.8121", 161.8121),  # kept as given: no range check here
        ("", None),
        ("abc", None),
        ("nan", None),
        ("43°75", None),
    ],
)
def test_parse_coordinate(text, expected):
    value = parse_coordinate(text)
    assert value == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("date", "time", "expected"),
    [
        ("20160719", "020139.315", "2016-07-19T02:01:39.315Z"),
        ("20230626", "08:28:00.000", "2023-06-26T08:28:00.000Z"),
        ("20110628", "90239", "2011-06-28T09:02:39Z"),
        ("20200205", "111823", "2020-02-05T11:18:23Z"),
        ("20200205", "", "2020-02-05T00:00:00Z"),
        ("", "111823", None),
        ("20201332", "000000", None),
        ("20200205", "256100", None),
    ],
)
def test_parse_time(date, time, expected):
    assert parse_time(date, time) == expected


def test_a_byte_order_mark_before_latin1_content_keeps_the_first_column(sample_data, tmp_path):
    """Spreadsheet tools write a UTF-8 byte-order mark even when they save Latin-1: with object_lat first,
    the mark glued to its name used to lose every latitude without a flag."""
    src = sample_data / SAMPLE_TSVS[0]
    lines = [line.split("\t") for line in src.read_bytes().decode("utf-8").splitlines()]
    first = lines[0].index("object_lat")
    lines = [[cells[first], *cells[:first], *cells[first + 1:]] for cells in lines]
    lines[-1][-1] += "é"  # Latin-1 below: not valid UTF-8
    folder = tmp_path / "bom"
    shutil.copytree(src.parent, folder)
    table = folder / src.name
    table.write_bytes(b"\xef\xbb\xbf" + "\n".join("\t".join(cells) for cells in lines).encode("iso-8859-1") + b"\n")
    with pytest.raises(UnicodeDecodeError):
        table.read_bytes().decode("utf-8")
    rows, expected = read_all(table), csv_rows(src)
    assert len(rows) == len(expected)
    assert [r["Latitude"] for r in rows] == pytest.approx([float(e["object_lat"]) for e in expected])
