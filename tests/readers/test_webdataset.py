"""WebDataset shards: samples grouped by key, lineage text, json metadata, sub-ranges and unsafe members."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pzscale.errors import InputError
from pzscale.readers.folder import ClassFolderReader
from pzscale.readers.webdataset import WebDatasetReader, key_and_field

READER = WebDatasetReader()
COPEPOD = "animalia arthropoda copepoda calanoida"
DIATOM = "chromista ochrophyta bacillariophyceae"
META = {"dataset": "zooscan", "original_label": "Calanoida", "Latitude": 43.68, "Longitude": "7.31",
        "timestamp": "2013-05-01T10:00:00", "sample": "tow_3", "ignored": 1}


def _image(fmt: str, value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((5, 7, 3), value, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


SHARD0 = [
    ("image_0.png", _image("PNG", 10)), ("image_0.txt", f"  {COPEPOD}\n".encode()),
    ("image_1.png", _image("PNG", 20)), ("image_1.txt", DIATOM.encode()), ("image_1.json", json.dumps(META).encode()),
    ("image_2.txt", b"stray text without an image"),
    ("image_10.jpg", _image("JPEG", 30)), ("image_10.txt", COPEPOD.encode()),
]
SHARD1 = [
    ("image_3.png", _image("PNG", 40)), ("image_3.txt", DIATOM.encode()),
    ("image_4.png", _image("PNG", 50)),  # no lineage text
    ("image_5.json", b"{}"),  # no image
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wds") / "clip"
    folder.mkdir()
    _write_tar(folder / "shard_00000.tar", SHARD0)
    _write_tar(folder / "shard_00001.tar", SHARD1)
    (folder / "README.txt").write_text("not a shard")
    return folder


def test_key_and_field_follow_webdataset():
    assert key_and_field("image_12.jpg") == ("image_12", "jpg")
    assert key_and_field("dir.v1/image_12.seg.PNG") == ("dir.v1/image_12", "seg.png")
    assert key_and_field("README") is None and key_and_field(".hidden.txt") is None


def test_plan_counts_samples_with_an_image(shards):
    items = READER.plan(str(shards))
    assert [i.rows for i in items] == [3, 2]
    assert [i.error for i in items] == ["", ""]
    assert {i.info["source"] for i in items} == {"webdataset"}
    assert [i.source for i in items] == [str(shards / f"shard_0000{n}.tar") for n in (0, 1)]
    assert [i.size for i in items] == [(shards / f"shard_0000{n}.tar").stat().st_size for n in (0, 1)]
    assert [s["key"] for s in items[0].info["samples"]] == ["image_0", "image_1", "image_10"]  # sorted keys
    assert items[0].info["samples"][1]["json"][0] == "image_1.json"
    assert [s["image"][0] for s in items[1].info["samples"]] == ["image_3.png", "image_4.png"]
    # the folder, a glob and the files one by one plan the same shards
    assert READER.plan(str(shards / "shard_*.tar")) == items
    assert READER.plan(str(shards / "shard_00001.tar")) == items[1:]
    assert READER.plan(str(shards), source="clip")[0].info["source"] == "clip"


def test_records(shards):
    first, second = READER.plan(str(shards))
    rows = READER.read(first, 0, first.rows).to_pylist()
    members = dict(SHARD0)
    assert [r["image"] for r in rows] == [
        {"bytes": members[name], "path": name} for name in ("image_0.png", "image_1.png", "image_10.jpg")
    ]
    assert [r["ObjID"] for r in rows] == ["shard_00000/image_0", "shard_00000/image_1", "shard_00000/image_10"]
    assert rows[0]["original_path"] == "/shard_00000.tar/image_0.png"
    assert (rows[0]["lineage"], rows[0]["original_label"], rows[0]["dataset"]) == (COPEPOD, COPEPOD, "webdataset")
    assert (rows[0]["Latitude"], rows[0]["timestamp"]) == (None, None)
    # the json's fields, numbers as numbers; its label and dataset win over the lineage text and the default
    assert rows[1]["lineage"] == DIATOM
    assert (rows[1]["dataset"], rows[1]["original_label"]) == ("zooscan", "Calanoida")
    assert (rows[1]["Latitude"], rows[1]["Longitude"], rows[1]["timestamp"]) == (43.68, 7.31, META["timestamp"])
    assert (rows[0]["sample"], rows[1]["sample"]) == (None, "tow_3")  # a json's sample; none without one
    rows = READER.read(second, 0, second.rows).to_pylist()
    assert rows[0]["lineage"] == DIATOM and rows[1]["lineage"] is None and rows[1]["image"]["bytes"]


def _given(table) -> list[dict]:
    # records() leaves out columns no row of the range has (image_10 has no json): compare the values given
    return [{k: v for k, v in row.items() if v is not None} for row in table.to_pylist()]


def test_sub_ranges_match_the_full_read(shards):
    first, _ = READER.plan(str(shards))
    full = _given(READER.read(first, 0, 3))
    assert _given(READER.read(first, 1, 3)) == full[1:3]
    assert _given(READER.read(first, 2, 3)) == full[2:3]
    assert _given(READER.read(first, 0, 1)) + _given(READER.read(first, 1, 3)) == full
    assert READER.read(first, 1, 1).num_rows == 0


def test_guess_can_open(shards, tmp_path):
    assert READER.guess_can_open(str(shards))
    assert READER.guess_can_open(str(shards / "shard_00000.tar"))
    assert READER.guess_can_open(str(shards / "shard_*.tar"))
    class_tree = _write_tar(tmp_path / "classes.tar", [("top/A/a.png", _image("PNG", 1))])
    assert not READER.guess_can_open(str(class_tree))
    assert not READER.guess_can_open(str(tmp_path))  # a folder whose only tar is not a WebDataset
    assert not READER.guess_can_open(str(shards / "README.txt"))
    # and the class-folder fallback leaves shards alone: their images sit in no class folder
    assert not ClassFolderReader().guess_can_open(str(shards / "shard_00000.tar"))


def test_bad_shards_are_reported_and_no_shards_raise(shards, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "shard_00000.tar").write_bytes((shards / "shard_00000.tar").read_bytes())
    (folder / "shard_00001.tar").write_bytes(b"\0" * 100 + b"garbage")
    _write_tar(folder / "shard_00002.tar", [("image_9.txt", b"text only")])
    items = READER.plan(str(folder))
    assert [i.rows for i in items] == [3, 0, 0]
    assert "not a readable tar" in items[1].error and "no samples with an image" in items[2].error
    with pytest.raises(InputError, match="no samples with an image"):
        READER.plan(str(folder / "shard_00002.tar"))
    with pytest.raises(InputError, match="no .tar shards"):
        READER.plan(str(tmp_path / "nothing_here"))


@pytest.mark.parametrize("member,why", [
    (("../evil.png", tarfile.REGTYPE, ""), "'..' in path"),
    (("/tmp/evil.png", tarfile.REGTYPE, ""), "absolute path"),
    (("image_7.png", tarfile.SYMTYPE, "/etc/passwd"), "link"),
    (("image_7.png", tarfile.LNKTYPE, "image_0.png"), "link"),
])
def test_unsafe_members_are_refused(tmp_path, member, why):
    shard = tmp_path / "shard_00000.tar"
    name, kind, linkname = member
    with tarfile.open(shard, "w") as tar:
        for good, data in SHARD0[:2]:
            info = tarfile.TarInfo(good)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        info.size = 4 if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(b"evil") if kind == tarfile.REGTYPE else None)
        tar.addfile(tarfile.TarInfo("image_7.txt"), io.BytesIO(b""))
    before = set(tmp_path.rglob("*"))
    with pytest.raises(InputError) as err:
        READER.plan(str(shard))
    message = str(err.value)
    assert message.startswith(f"{shard}: unsafe member '{name}'") and why in message and "\n" not in message
    assert set(tmp_path.rglob("*")) == before
    assert not (tmp_path.parent / "evil.png").exists()


# ---------------------------------------------------------------- malformed metadata is flagged, not lost (issue 17)

MALFORMED = [
    ("s0.png", _image("PNG", 1)), ("s0.txt", COPEPOD.encode()), ("s0.json", b"{not json"),
    ("s1.png", _image("PNG", 2)), ("s1.json", b"[1, 2]"),  # JSON, but no object
    ("s2.png", _image("PNG", 3)),
    ("s2.json", json.dumps({"Latitude": "north", "Longitude": "abc", "Depth_min": "5", "Temperature": True,
                            "Humidity": [1], "timestamp": "soon"}).encode()),
    ("s3.png", _image("PNG", 4)),
    ("s3.json", json.dumps({"Latitude": "43°30'N", "Longitude": None, "Depth_max": "NaN", "Depth_min": ""}).encode()),
    ("s4.png", _image("PNG", 5)), ("s4.json", b'{"Latitude": Infinity, "Longitude": 1' + b"0" * 400 + b"}"),
    ("s5.png", _image("PNG", 6)), ("s5.cls", b"3\n"),  # a class index: the label when nothing else gives one
    ("s6.png", _image("PNG", 7)), ("s6.cls", b"abc"), ("s6.txt", b"\xff\xfe lineage"),
    ("s7.png", _image("PNG", 8)), ("s7.json", b'{"Latitude": "\xff"}'),  # no UTF-8
]
MALFORMED_QC = ["json_unparsed", "json_unparsed", "lat_unparsed;lon_unparsed;instrument_temperature_unparsed;"
                "instrument_humidity_unparsed", "", "lat_unparsed;lon_unparsed", "", "txt_unparsed;cls_unparsed",
                "json_unparsed"]


def test_malformed_metadata_is_flagged_per_sample_and_the_image_kept(tmp_path):
    shard = _write_tar(tmp_path / "bad_00000.tar", MALFORMED)
    [item] = READER.plan(str(shard))
    assert item.rows == 8
    rows = READER.read(item, 0, item.rows).to_pylist()
    assert len(rows) == item.rows
    assert [r["reader_qc"] for r in rows] == MALFORMED_QC
    images = dict(MALFORMED)
    assert [r["image"]["bytes"] for r in rows] == [images[f"s{i}.png"] for i in range(8)]
    assert rows[0]["lineage"] == COPEPOD  # the txt survives a broken json
    assert "Longitude" not in rows[0]  # no sample has a longitude that parses
    assert (rows[2]["Latitude"], rows[2]["Depth_min"], rows[2].get("Temperature")) == (None, 5.0, None)
    assert rows[2]["timestamp"] == "soon"  # text: the ingest parses timestamps and flags this one itself
    assert (rows[3]["Latitude"], rows[3]["Depth_min"], rows[3].get("Depth_max")) == (43.5, None, None)  # NaN, ""
    assert (rows[5]["original_label"], rows[6]["original_label"]) == ("3", "\ufffd\ufffd lineage")
    assert [r["reader_qc"] for r in READER.read(item, 2, 5).to_pylist()] == MALFORMED_QC[2:5]


@pytest.mark.cluster
@pytest.mark.slow
def test_malformed_metadata_flags_reach_the_catalog_once(tmp_path, client):
    from pzscale import open_catalog
    from pzscale.ingest import ingest

    shard = _write_tar(tmp_path / "bad_00000.tar", MALFORMED)
    url = str(tmp_path / "cat.zarr")
    ingest([str(shard)], url, format="webdataset", shard_len=64, client=client, progress=False)
    ds = open_catalog(url).drop_vars("image_bytes").compute()
    assert ds.sizes["image"] == 8 and set(ds["status"].values) == {"ok"}
    qc = [q.split(";") if q else [] for q in ds["qc"].values]
    expected = [f.split(";") if f else [] for f in MALFORMED_QC]
    expected[2].append("time_unparsed")  # the ingest's own flag for the timestamp "soon"
    assert [sorted(q) for q in qc] == [sorted(e) for e in expected]  # each flag once, none lost
    assert np.isnan(ds["lat"].values[2]) and ds["lat"].values[3] == 43.5


def test_read_keys_gives_the_ids_of_read_without_the_images(shards, tmp_path):
    from pzscale.readers.base import keys_only

    items = [*READER.plan(str(shards)), *READER.plan(str(_write_tar(tmp_path / "bad_00000.tar", MALFORMED)))]
    for item in items:
        assert READER.read_keys(item).to_pylist() == keys_only(READER.read(item, 0, item.rows)).to_pylist()
    assert READER.read_keys(items[0]).column("dataset").to_pylist() == ["webdataset", "zooscan", "webdataset"]


def test_what_a_shard_does_not_read_is_counted_in_one_note(shards, tmp_path):
    first, second = READER.plan(str(shards))
    assert first.notes == [f"{shards / 'shard_00000.tar'}: 1 sample(s) without an image skipped (1 member(s))"]
    assert second.notes == [f"{shards / 'shard_00001.tar'}: 1 sample(s) without an image skipped (1 member(s))"]
    old, new = _image("PNG", 60), _image("PNG", 70)
    shard = _write_tar(tmp_path / "odd_00000.tar", [
        ("k.png", _image("PNG", 50)), ("k.txt", COPEPOD.encode()), ("k.jpg", _image("JPEG", 80)),
        ("r.png", old), ("r.png", new),  # a name held twice: the last copy is read
        ("k.npy", b"\0"), ("k.seg.png", _image("PNG", 90)),
        ("README", b"x"), (".hidden.txt", b"x"), ("lone.json", b"{}"), ("lone.cls", b"1"),
    ])
    [item] = READER.plan(str(shard))
    assert item.rows == 2
    assert item.notes == [f"{shard}: 1 sample(s) without an image skipped (2 member(s)); 1 more image(s) of a sample "
                          "that has several (its first image field by name is read); 2 member(s) of fields not read "
                          "(1 .npy, 1 .seg.png); 1 member name(s) repeated in the tar (the last copy is read); "
                          "2 file(s) with no <key>.<field> name (hidden, or no extension)"]
    k, r = READER.read(item, 0, 2).to_pylist()
    assert (k["image"]["path"], k["lineage"]) == ("k.jpg", COPEPOD)  # 'jpg' < 'png': the first field by name
    assert r["image"]["bytes"] == new
