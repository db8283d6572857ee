"""Parquet rows -> catalog variables, on small hand-made tables (no cluster)."""

import numpy as np
import pyarrow as pa

from pzscale.records import columns_from_table
from pzscale.schema import TIME_FILL, VARIABLE_NAMES
from pzscale.synth import encode


def _png(value=100):
    from PIL import Image

    return encode(Image.new("L", (7, 5), value), "PNG")


def test_types_nulls_ids_and_status():
    table = pa.table({
        "image": pa.array([{"bytes": _png(), "path": "a.png"}, {"bytes": None, "path": None},
                           {"bytes": b"\x89PNG\r\n\x1a\nbroken", "path": "c.png"}],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "dataset": ["whoi", "global_uvp5", "zooscan"],
        "original_label": ["Chaetoceros", "detritus", None],
        "original_path": ["/Chaetoceros/D20160101T000000_IFCB010_00001.png", None, None],
        "ObjID": [None, "98765", None],
        "Kingdom": ["Chromista", None, None], "Phylum": ["heterokontophyta", None, None],
        "Class": [None] * 3, "Order": [None] * 3, "Family": [None] * 3,
        "Genus": ["chaetoceros", None, None], "Species": ["didymus", None, None],
        "proposed_label": ["chaetoceros didymus", "detritus", None],
        "plankton": ["True", "False", None],
        "root_class": ["living", "detritus", None], "qualifier": ["full_body", "", None],
        "Latitude": ["41.3", "bad", None], "Longitude": [-70.5, 10.0, None],
        "Depth_min": [4.0, 10.0, None], "Depth_max": [4.0, 60.0, None],
        "Humidity": [40.0, None, None], "Temperature": [21.0, None, None],
        "aphia_ID": ["149122.0", None, "x"], "NCBI_ID": [49238.0, None, None],
        "timestamp": ["2016-01-01T00:00:00Z", "2019-06-01 12:30:00+02:00", "not a time"],
    })
    cols = columns_from_table(table, row_names=["f.parquet#0", "f.parquet#1", "f.parquet#2"])
    assert set(cols) == set(VARIABLE_NAMES)
    assert list(cols["image_id"]) == ["whoi:D20160101T000000_IFCB010_00001.png", "global_uvp5:98765",
                                      "zooscan:f.parquet#2"]
    assert list(cols["instrument"]) == ["IFCB", "UVP5", "ZooScan"]
    assert list(cols["status"]) == ["ok", "missing_image", "decode_error"]
    assert cols["error"][0] == "" and cols["error"][2].startswith(("ValueError", "SyntaxError", "OSError"))
    assert (cols["height"][0], cols["width"][0], cols["mode"][0]) == (5, 7, "L")
    assert cols["image_bytes"][1] == b""
    assert cols["lineage"][0] == "chromista heterokontophyta chaetoceros didymus"
    assert list(cols["plankton"]) == [True, False, False]
    assert list(cols["aphia_id"]) == [149122, 0, 0]
    assert list(cols["ncbi_id"]) == ["49238", "", ""]
    np.testing.assert_array_equal(cols["lat"], [41.3, np.nan, np.nan])
    assert list(cols["qc"]) == ["", "lat_unparsed", "time_unparsed"]
    assert cols["lat"].dtype == np.float64 and cols["depth_max"].dtype == np.float32
    times = cols["time"]
    assert times[0] == np.datetime64("2016-01-01T00:00:00", "ms").astype(np.int64)
    assert times[1] == np.datetime64("2019-06-01T10:30:00", "ms").astype(np.int64)  # to UTC
    assert times[2] == TIME_FILL
    assert list(cols["license"]) == ["", "", ""]  # v1.0 shards have no licence columns


def test_impossible_metadata_becomes_nan_with_a_qc_flag():
    n = 8
    table = pa.table({
        "image": pa.array([{"bytes": _png(), "path": None}] * n,
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "dataset": ["s"] * n,
        "ObjID": [str(i) for i in range(n)],
        "Latitude": [45.0, 95.0, float("inf"), 10.0, 10.0, 10.0, 10.0, None],
        "Longitude": [200.0, 10.0, 10.0, -181.0, 10.0, 10.0, 10.0, None],
        "Depth_min": [5.0, 5.0, 5.0, 5.0, -50.0, 30.0, 5.0, None],
        "Depth_max": [5.0, 5.0, 5.0, 5.0, 10.0, 20.0, 5.0, None],
        "timestamp": ["2020-01-01T00:00:00Z"] * 6 + ["1850-01-01T00:00:00Z", "3000-01-01T00:00:00Z"],
    })
    cols = columns_from_table(table, row_names=[f"x#{i}" for i in range(n)])
    assert cols["lat"][0] == 45.0 and cols["lon"][0] == -160.0 and cols["qc"][0] == ""  # 0..360 -> -180..180
    for i in (1, 2, 3):
        assert np.isnan(cols["lat"][i]) and np.isnan(cols["lon"][i])
        assert cols["qc"][i] == "position_out_of_range"
    for i in (4, 5):  # above the surface; min below max
        assert np.isnan(cols["depth_min"][i]) and np.isnan(cols["depth_max"][i])
        assert cols["qc"][i] == "depth_out_of_range"
    assert cols["time"][6] == TIME_FILL and cols["qc"][6] == "time_out_of_range"
    assert cols["time"][7] == TIME_FILL and cols["qc"][7] == "time_out_of_range"
    assert all(np.isfinite(cols["lat"][[0, 4, 5, 6]]))


def test_unparsable_values_are_flagged_not_silently_dropped():
    table = pa.table({
        "image": pa.array([{"bytes": _png(), "path": None}] * 2,
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "dataset": ["s", "s"], "ObjID": ["1", "2"],
        "Latitude": ["12.5", "north-ish"], "Longitude": ["3", "3"], "timestamp": ["2020-05-01", "yesterday"],
    })
    cols = columns_from_table(table, row_names=["x#0", "x#1"])
    assert cols["qc"][0] == "" and cols["lat"][0] == 12.5
    assert np.isnan(cols["lat"][1]) and cols["qc"][1] == "lat_unparsed;time_unparsed"


def test_integer_columns_beyond_float_precision_are_read_not_refused():
    """Found by the fuzz suite: an int64 column holding 2**53 + 1 made Arrow's safe cast raise."""
    big = 2**53 + 1
    table = pa.table({
        "image": pa.array([{"bytes": _png(), "path": None}] * 2,
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "dataset": ["s", "s"], "ObjID": ["1", "2"],
        "Depth_min": pa.array([big, 7], pa.int64()), "Depth_max": pa.array([big, 7], pa.int64()),
        "Latitude": pa.array([10, 20], pa.int64()), "Longitude": pa.array([-big, 30], pa.int64()),
    })
    cols = columns_from_table(table, row_names=["x#0", "x#1"])
    assert cols["depth_max"][1] == 7.0 and cols["lat"][1] == 20.0 and cols["lon"][1] == 30.0
    assert np.isnan(cols["lon"][0]) and np.isnan(cols["depth_max"][0])  # read, then range-checked
    assert cols["qc"][0] == "position_out_of_range;depth_out_of_range"
    assert cols["qc"][1] == ""


def test_one_label_typed_two_unicode_ways_is_one_label():
    import unicodedata

    composed, decomposed = "Noctilucé", unicodedata.normalize("NFD", "Noctilucé")
    assert composed != decomposed
    table = pa.table({
        "image": pa.array([{"bytes": _png(), "path": p} for p in ("a.png", "b.png")],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "dataset": ["lab", "lab"], "original_label": [composed, decomposed],
        "original_path": [f"{composed}/a.png", f"{decomposed}/b.png"],
    })
    cols = columns_from_table(table, row_names=["f.parquet#0", "f.parquet#1"])
    assert list(cols["original_label"]) == [composed, composed]
    assert list(cols["original_path"]) == [f"{composed}/a.png", f"{composed}/b.png"]


def test_a_housing_humidity_or_plankton_flag_that_does_not_parse_is_flagged():
    table = pa.table({
        "image": pa.array([{"bytes": _png(), "path": p} for p in ("a.png", "b.png", "c.png")],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "dataset": ["lab"] * 3, "Humidity": ["41.5", "damp", ""], "plankton": ["yes", "maybe", "False"],
    })
    cols = columns_from_table(table, row_names=["f#0", "f#1", "f#2"])
    np.testing.assert_array_equal(cols["instrument_humidity"], np.array([41.5, np.nan, np.nan], np.float32))
    assert list(cols["plankton"]) == [True, False, False]
    assert cols["qc"][0] == "" and cols["qc"][2] == ""
    assert set(cols["qc"][1].split(";")) == {"instrument_humidity_unparsed", "plankton_unparsed"}
