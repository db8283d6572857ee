"""Fuzzing the parsers of untrusted files, bounded in time: whatever the bytes, they return records or raise
one of pzscale's documented errors (``pzscale.errors``), never a stray ValueError, KeyError or TypeError.

- IFCB: the .adc and .hdr parsers, and whole bins (.adc + .hdr + .roi) planned and read;
- EcoTaxa: TSV tables planned and read back, rows exactly as many as planned, also when a read seeks;
- Planktonzilla parquet: the schema check, and for every file it accepts, the read and the turning of
  records into catalog variables (what a shard task does), which must then never fail.
"""

from __future__ import annotations

import datetime as dt
import decimal
import io
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pzscale import readers
from pzscale.errors import PzscaleError
from pzscale.readers import ecotaxa, ifcb
from pzscale.readers.base import NUMBER_COLUMNS
from pzscale.records import columns_from_table
from pzscale.schema import PARQUET_COLUMNS, PARQUET_REQUIRED
from tests.reliability.helpers import TALLY

# Bounded: each test runs a few seconds; no example database written into the repository.
FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _count(name: str) -> None:
    TALLY.fuzz_examples[name] += 1
    TALLY.used = True


def _png(width: int = 6, height: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(width * height, dtype=np.uint8).reshape(height, width)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- IFCB

NUMBER_TEXT = st.one_of(
    st.integers(-1000, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["-999", "-999.00000", "", " ", "nan", "inf", "-inf", "1e400", ".5", "8.984375E-02", "abc",
                     "0x10", "1_000", "\t3", "\u0663"]),
    st.text(max_size=4),
)
ADC_LINE = st.lists(NUMBER_TEXT, max_size=26).map(",".join)
HDR_LINE = st.one_of(
    st.tuples(st.sampled_from(["runTime", "inhibitTime", "gpsLatitude", "gpsLongitude", "depth", "Temp",
                               "temperature", "Humidity", "softwareVersion"]), NUMBER_TEXT).map(": ".join),
    st.text(max_size=30),
    st.lists(NUMBER_TEXT, max_size=6).map(lambda cells: '"' + '","'.join(cells) + '"'),
)


@FUZZ
@given(lines=st.lists(ADC_LINE, max_size=10), schema=st.sampled_from([1, 2]),
       hdr_lines=st.lists(HDR_LINE, max_size=8))
def test_ifcb_adc_and_hdr_parsers(lines, schema, hdr_lines):
    _count("ifcb .adc/.hdr")
    hdr = ifcb.parse_hdr("\n".join(hdr_lines))  # a header never fails: unknown lines are skipped
    assert isinstance(hdr, dict)
    try:
        adc = ifcb.parse_adc("\n".join(lines), schema, name="fuzz.adc")
    except PzscaleError:
        return
    found = ifcb.image_lines(adc)
    assert len(found) <= len(lines)
    lid = "IFCB5_2012_028_081515" if schema == 1 else "D20220522T000439_IFCB134"
    if len(adc["width"]):
        ifcb.bin_metadata(lid, hdr, adc, schema)


def _adc_line(schema: int, width: int, height: int, start: int) -> str:
    values = ["1"] * ifcb.ADC_COLUMNS[schema]["count"]
    columns = ifcb.ADC_COLUMNS[schema]
    values[columns["width"]], values[columns["height"]], values[columns["start_byte"]] = map(str, (width, height,
                                                                                                  start))
    return ",".join(values) + ("," if schema == 1 else "")


SIZE = st.one_of(st.integers(-2, 40), st.sampled_from([0.5, 0.4, 1.5, -999, "nan", "inf", 1e300]))
ROI = st.tuples(SIZE, SIZE, st.one_of(st.integers(-5, 3000), st.sampled_from([10.5, -999, "nan", 1e18])))


@FUZZ
@given(schema=st.sampled_from([1, 2]), rois=st.lists(ROI, max_size=6), roi_size=st.integers(0, 4000),
       junk=st.lists(ADC_LINE, max_size=2), hdr_lines=st.lists(HDR_LINE, max_size=4))
def test_ifcb_bins_plan_and_read(schema, rois, roi_size, junk, hdr_lines):
    """Bins whose ADC lines point anywhere in (or beyond) the .roi, with junk lines among them."""
    _count("ifcb bins")
    lid = "IFCB5_2012_028_081515" if schema == 1 else "D20220522T000439_IFCB134"
    with tempfile.TemporaryDirectory() as folder:
        stem = Path(folder) / lid
        stem.with_suffix(".adc").write_text("\n".join([*(_adc_line(schema, *r) for r in rois), *junk]))
        stem.with_suffix(".hdr").write_text("\n".join(hdr_lines) or "softwareVersion: 1")
        stem.with_suffix(".roi").write_bytes(bytes(range(256)) * (roi_size // 256) + bytes(roi_size % 256))
        reader = readers.get("ifcb")
        try:
            [item] = reader.plan(folder)
        except PzscaleError:
            return
        if item.error:
            assert item.rows == 0
            return
        # a ROI that cannot be cut (fractional, negative or missing size, bytes beyond the .roi) is a row without
        # image bytes that says why: the read never fails for it, and no row is lost or added
        table = reader.read(item, 0, item.rows)
        assert table.num_rows == item.rows
        errors = table.column("image_error").to_pylist() if "image_error" in table.column_names else [None] * item.rows
        for image, why in zip(table.column("image").to_pylist(), errors, strict=True):
            assert bool(image["bytes"]) != bool(why)
            assert why is None or ("\n" not in why and why.startswith(f"{lid}.adc roi "))


# ---------------------------------------------------------------- EcoTaxa

COLUMNS = ["img_file_name", "object_id", "object_lat", "object_lon", "object_date", "object_time",
           "object_depth_min", "object_annotation_category", "object_annotation_status", "acq_instrument",
           "acq_pixel", "object_aphiaid", "sample_id", "extra"]
CELL = st.one_of(
    st.sampled_from(["", "a.png", "sub/a.png", "sub\\a.png", "missing.png", "../a.png", "/etc/passwd", "43°30",
                     "43Â°30 36", "-12°15.25'", "12°15'S", "nan", "inf", "95", "-200", "20230102", "99991332",
                     "020139.315", "08:28:00.000", "uvp6", "IFCB", '"', '""', '"a\tb"', '"a\nb"', "\r", "[t]", "[f]",
                     "validated", "1e400", "\x00"]),
    st.text(alphabet=st.characters(codec="latin-1"), max_size=6),
)


def _tsv(header: list[str], rows: list[list[str]], type_row: bool, encoding: str, line_end: str) -> bytes:
    lines = ["\t".join(header)]
    if type_row:
        lines.append("\t".join("[t]" for _ in header))
    lines += ["\t".join(cells) for cells in rows]
    return (line_end.join(lines) + line_end).encode(encoding, errors="replace")


@FUZZ
@given(header=st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=8, unique=True),
       rows=st.lists(st.lists(CELL, max_size=9), max_size=7), type_row=st.booleans(),
       encoding=st.sampled_from(["utf-8", "iso-8859-1"]), line_end=st.sampled_from(["\n", "\r\n"]),
       blank_every=st.integers(0, 3), tail=st.binary(max_size=4), window=st.tuples(st.integers(0, 8),
                                                                                  st.integers(0, 8)))
def test_ecotaxa_tables_plan_and_read(header, rows, type_row, encoding, line_end, blank_every, tail, window):
    _count("ecotaxa tsv")
    if blank_every:
        rows = [cells for i, r in enumerate(rows) for cells in ([r, []] if i % blank_every == 0 else [r])]
    data = _tsv(header, rows, type_row, encoding, line_end) + tail
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        patch.setattr(ecotaxa, "CHECKPOINT", 2)  # late slices seek to recorded offsets even in small tables
        path = Path(folder) / "ecotaxa_fuzz.tsv"
        path.write_bytes(data)
        (Path(folder) / "a.png").write_bytes(_png())
        reader = readers.get("ecotaxa")
        try:
            items = reader.plan(str(path))
        except PzscaleError:
            return
        for item in items:
            if item.error:
                assert item.rows == 0
                continue
            first, stop = sorted(min(w, item.rows) for w in window)
            for a, b in ((0, item.rows), (first, stop)):
                try:
                    table = reader.read(item, a, b)
                except PzscaleError:
                    continue
                assert table.num_rows == b - a


# ---------------------------------------------------------------- parquet schema check

SCALAR_TYPES = {
    "string": (pa.string(), st.text(max_size=8)),
    "large_string": (pa.large_string(), st.text(max_size=8)),
    "int64": (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    "uint8": (pa.uint8(), st.integers(0, 255)),
    "float64": (pa.float64(), st.floats(allow_nan=True, allow_infinity=True)),
    "float16": (pa.float16(), st.sampled_from([np.float16(1.5), np.float16("inf"), np.float16("nan")])),
    "bool": (pa.bool_(), st.booleans()),
    "decimal": (pa.decimal128(12, 3), st.decimals(min_value=-10**8, max_value=10**8, places=3, allow_nan=False)),
    "timestamp": (pa.timestamp("ms", tz="UTC"), st.datetimes(min_value=dt.datetime(1, 1, 2),
                                                            timezones=st.just(dt.UTC))),
    "date": (pa.date32(), st.dates()),
    "null": (pa.null(), st.none()),
    "dictionary": (pa.dictionary(pa.int32(), pa.string()), st.text(max_size=4)),
}
OTHER_TYPES = {
    "binary": (pa.binary(), st.binary(max_size=6)),
    "list": (pa.list_(pa.float64()), st.lists(st.floats(), max_size=2)),
    "struct": (pa.struct([("a", pa.int32())]), st.fixed_dictionaries({"a": st.integers(-5, 5)})),
}
IMAGE_VALUES = st.one_of(st.none(), st.fixed_dictionaries({
    "bytes": st.one_of(st.none(), st.just(b""), st.just(_png()), st.binary(max_size=40),
                       st.just(_png()[:30])),
    "path": st.one_of(st.none(), st.text(max_size=6)),
}))


@st.composite
def parquet_tables(draw) -> pa.Table:
    n = draw(st.integers(0, 4))
    names = list(PARQUET_COLUMNS) + draw(st.lists(st.sampled_from(["latitude", "imagee", "extra"]), max_size=2))
    names = [c for c in names if c == "image" or c not in PARQUET_REQUIRED or draw(st.integers(0, 200)) > 0]
    if draw(st.integers(0, 20)) == 0:
        names.append(draw(st.sampled_from(names)))  # a repeated column
    fields, arrays = [], []
    for name in names:
        if name == "image":
            kind = draw(st.sampled_from(["struct"] * 8 + ["binary", "string"]))
            if kind == "struct":
                arrow_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
                values = [draw(IMAGE_VALUES) for _ in range(n)]
            else:
                arrow_type, values = (pa.binary(), [_png()] * n) if kind == "binary" else (pa.string(), ["x"] * n)
        else:
            pool = SCALAR_TYPES if draw(st.integers(0, 200)) else OTHER_TYPES
            arrow_type, values_of = pool[draw(st.sampled_from(sorted(pool)))]
            values = [draw(st.one_of(st.none(), values_of)) for _ in range(n)]
        if pa.types.is_decimal(arrow_type):
            values = [None if v is None else decimal.Decimal(v) for v in values]
        fields.append(pa.field(name, arrow_type))
        arrays.append(pa.array(values, type=arrow_type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


@FUZZ
@given(table=parquet_tables(), damage=st.sampled_from(["none"] * 6 + ["truncate", "flip", "garbage"]),
       cut=st.integers(0, 10**6))
def test_parquet_schema_check_and_records(table, damage, cut):
    _count("parquet files")
    reader = readers.get("parquet")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "part.parquet"
        pq.write_table(table, path)
        data = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(data[: cut % max(len(data), 1)])
        elif damage == "flip":
            spot = cut % len(data)
            path.write_bytes(data[:spot] + bytes([data[spot] ^ 0xFF]) + data[spot + 1:])
        elif damage == "garbage":
            path.write_bytes(np.random.default_rng(cut).bytes(cut % 200))
        try:
            [item] = reader.plan(str(path))
            records = reader.read(item, 0, item.rows)
        except PzscaleError:
            return
    # what the schema check accepts, a shard task must turn into catalog variables without failing
    columns = columns_from_table(records, row_names=[f"part.parquet#{i}" for i in range(records.num_rows)])
    assert all(len(v) == records.num_rows for v in columns.values())


# ---------------------------------------------------------------- what the fuzzer found, pinned


def _planktonzilla_table(n: int, **columns: pa.Array) -> pa.Table:
    image = pa.array([{"bytes": _png(), "path": f"{i}.png"} for i in range(n)],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    arrays = {name: pa.array([None] * n, pa.float64()) if name in NUMBER_COLUMNS else
              pa.array([f"{name}{i}" for i in range(n)]) for name in PARQUET_REQUIRED if name != "image"}
    arrays["plankton"] = pa.array(["True", "False"] * (n // 2) + ["True"] * (n % 2))  # a yes/no column
    return pa.table({"image": image, **arrays, **columns})


def test_parquet_types_the_fuzzer_found_become_values_and_flags():
    """Each of these once failed a whole shard task (pyarrow or numpy raised) after the schema check passed."""
    table = _planktonzilla_table(
        3,
        dataset=pa.array([float("inf"), float("nan"), 12345.0]),  # text written as floats
        original_label=pa.array([1.5, None, 2.0], pa.float16()),  # no round kernel for float16
        timestamp=pa.array([True, False, None]),  # pandas left booleans tz-naive
        Temperature=pa.array([1e300, float("-inf"), 20.5]),  # beyond float32
        aphia_ID=pa.array([2**63 - 1, -5, 104464]),  # beyond int64 once parsed as float
    )
    cols = columns_from_table(table, row_names=["f#0", "f#1", "f#2"])
    # text written as floats: whole numbers as integers, the rest as written (1.5 is never rounded to 2)
    assert list(cols["source"]) == ["inf", "", "12345"] and list(cols["original_label"]) == ["1.5", "", "2"]
    assert list(cols["aphia_id"]) == [0, 0, 104464]
    assert np.isnan(cols["instrument_temperature"][:2]).all() and cols["instrument_temperature"][2] == 20.5
    qc = [set(q.split(";")) for q in cols["qc"]]
    assert {"instrument_temperature_out_of_range", "time_unparsed"} <= qc[0]
    assert {"instrument_temperature_out_of_range", "time_unparsed"} <= qc[1] and qc[2] == {""}


def test_single_byte_corruptions_of_a_parquet_footer_are_input_errors(tmp_path):
    """A flipped byte in the footer's schema once escaped as UnicodeDecodeError (a column name that is not
    UTF-8). Every byte of the footer's first 400 (the schema: names, types) and last 100 is tried."""
    path = tmp_path / "part.parquet"
    pq.write_table(_planktonzilla_table(2), path)
    data = path.read_bytes()
    footer = int.from_bytes(data[-8:-4], "little") + 8
    reader = readers.get("parquet")
    outcomes = set()
    start = len(data) - footer
    for spot in [*range(start, start + 400), *range(len(data) - 100, len(data))]:
        path.write_bytes(data[:spot] + bytes([data[spot] ^ 0xFF]) + data[spot + 1:])
        try:
            reader.plan(str(path))
            outcomes.add("planned")
        except PzscaleError:
            outcomes.add("refused")
    _count("parquet footer bytes")
    assert "refused" in outcomes


def test_a_row_with_extra_cells_read_from_a_checkpoint_is_the_rows_own_value(tmp_path, monkeypatch):
    """A window starting at a recorded row offset once raised IndexError inside pandas when a row had more
    cells than the header (the columns were picked by a callable); the whole-table read had worked."""
    monkeypatch.setattr(ecotaxa, "CHECKPOINT", 2)
    path = tmp_path / "ecotaxa_extra.tsv"
    path.write_bytes(_tsv(["img_file_name"], [["", ""], ["a.png"], ["a.png"], ["", ""]], False, "utf-8", "\n"))
    (tmp_path / "a.png").write_bytes(_png())
    reader = readers.get("ecotaxa")
    [item] = reader.plan(str(path))
    whole = reader.read(item, 0, item.rows).to_pylist()
    assert [reader.read(item, i, i + 1).to_pylist() for i in range(item.rows)] == [[row] for row in whole]
    _count("ecotaxa tsv")


def test_invalid_utf8_in_a_parquet_text_column_is_an_input_error_naming_the_file(tmp_path):
    """A flipped byte in a dictionary page once left invalid UTF-8 that pyarrow read without a word and
    that failed the shard task later, while converting the column to Python strings."""
    path = tmp_path / "part.parquet"
    bad = pa.array([b"ok", b"\xff\xfe"], pa.binary()).view(pa.string())  # as a corrupt page decodes
    pq.write_table(_planktonzilla_table(2, original_label=bad), path)
    reader = readers.get("parquet")
    [item] = reader.plan(str(path))
    with pytest.raises(PzscaleError, match=r"part\.parquet: cannot read rows 0-2 \(.*UTF8"):
        reader.read(item, 0, item.rows)
    _count("parquet files")
