"""Parquet rows -> catalog variables, on small hand-made tables (no cluster)."""

import numpy as np
import pyarrow as pa

from pzscale.ingest import columns_from_table
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
    assert cols["lat"].dtype == np.float64 and cols["depth_max"].dtype == np.float32
    times = cols["time"]
    assert times[0] == np.datetime64("2016-01-01T00:00:00", "ms").astype(np.int64)
    assert times[1] == np.datetime64("2019-06-01T10:30:00", "ms").astype(np.int64)  # to UTC
    assert times[2] == TIME_FILL
    assert list(cols["license"]) == ["", "", ""]  # v1.0 shards have no licence columns
