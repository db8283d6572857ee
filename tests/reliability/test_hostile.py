"""Hostile and broken input: every case gets a clear error or a status on its row, and the rest of the
data goes through. Cases already covered elsewhere (unsafe tar/zip members of class-folder archives,
pickles read directly, truncated PNG probes) are listed in the session summary, not repeated.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import tarfile
import zipfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pzscale import catalog, readers
from pzscale.embed import embed
from pzscale.errors import InputError, ModelError
from pzscale.ingest import ingest
from pzscale.limits import Limits, using
from pzscale.ml import models
from pzscale.schema import TIME_FILL

pytestmark = [pytest.mark.cluster]

M106 = "ecotaxa_back/import_test/m106_mn01_n1_sml"


def _rows(url: str, *names: str) -> dict[str, np.ndarray]:
    group = catalog.open_group(url)
    return {name: group[name][:] for name in names}


def _png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A few dozen bytes of PNG whose header declares ``width`` x ``height`` greyscale pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def _jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width), 128, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


# ---------------------------------------------------------------- untrusted paths and metadata in a table


def test_ecotaxa_table_naming_files_outside_its_folder(sample_data, client, tmp_path, tally):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.jpg"
    secret.write_bytes(_jpeg(12, 9))  # a real image: if it were read, it would decode and be 'ok'
    tables = tmp_path / "tables"
    shutil.copytree(sample_data / M106, tables)
    (tables / "link.jpg").symlink_to(secret)
    jpgs = sorted(p.name for p in (sample_data / M106).glob("*.jpg"))
    hostile = {
        "../outside/secret.jpg": "'..' in path", str(secret): "absolute path", "link.jpg": "link leading out",
        "C:\\evil.jpg": "absolute path", "sub\\..\\..\\outside\\secret.jpg": "'..' in path",
        "missing.jpg": "FileNotFoundError",
    }
    # coordinates and dates as they come in messy exports: NaN, inf, out of range, unparseable, minutes >= 60
    metadata = [("nan", "inf"), ("95", "10"), ("-12.5", "-200"), ("43°75'", "7"), ("abc", ""), ("43°30", "7.5")]
    lines = ["img_file_name\tobject_id\tobject_lat\tobject_lon\tobject_date\tobject_annotation_category",
             "[t]\t[t]\t[f]\t[f]\t[t]\t[t]"]
    names = [jpgs[0], *hostile, jpgs[1]]
    for i, name in enumerate(names):
        lat, lon = metadata[i % len(metadata)]
        lines.append(f"{name}\tobj_{i}\t{lat}\t{lon}\t{'99991332' if i == 2 else '20140420'}\tcopepoda")
    (tables / "ecotaxa_hostile.tsv").write_text("\n".join(lines) + "\n")
    for name in hostile:
        tally.hostile_input(f"EcoTaxa img_file_name {'<absolute path>' if name == str(secret) else repr(name)}")
    tally.hostile_input("EcoTaxa NaN/inf/out-of-range/unparseable coordinates and an impossible date")
    url = str(tmp_path / "cat.zarr")
    report = ingest([str(tables / "ecotaxa_hostile.tsv")], url, shard_len=64, client=client, progress=False)
    rows = _rows(url, "object_id", "status", "error", "image_bytes", "lat", "lon", "qc", "time")
    assert tally.check_rows(rows["object_id"], [f"obj_{i}" for i in range(len(names))]) == (0, 0)
    assert report.status == {"ok": 2, "missing_image": len(hostile)}
    assert list(rows["status"][[0, -1]]) == ["ok", "ok"]
    for i, why in enumerate(hostile.values(), start=1):
        assert rows["status"][i] == "missing_image" and why in rows["error"][i], (i, rows["error"][i])
        assert "\n" not in rows["error"][i] and bytes(rows["image_bytes"][i]) == b""
    assert secret.read_bytes() not in {bytes(b) for b in rows["image_bytes"]}
    lat, lon, qc = rows["lat"], rows["lon"], [set(q.split(";")) - {""} for q in rows["qc"]]
    assert np.isnan(lat[:5]).all() and np.isnan(lon[[0, 1, 2, 4]]).all() and lon[3] == 7
    assert qc[0] == {"lon_unparsed"}  # "nan" says no value; "inf" is a bad one
    assert qc[1] == {"position_out_of_range"}  # 95 degrees north
    assert qc[2] == {"position_out_of_range", "time_unparsed"}  # -200 east; month 13
    assert qc[3] == {"lat_unparsed"}  # 43°75': minutes >= 60
    assert qc[4] == {"lat_unparsed"}  # "abc"; an empty longitude is simply missing
    assert qc[5] == set() and lat[5] == pytest.approx(43.5) and lon[5] == pytest.approx(7.5)
    assert rows["time"][2] == TIME_FILL and rows["time"][1] != TIME_FILL


# ---------------------------------------------------------------- decompression bombs and truncated images


def test_image_bombs_and_truncated_images_are_rows_with_a_status(client, tmp_path, tally):
    tree = tmp_path / "tree" / "imgs" / "A"
    tree.mkdir(parents=True)
    good, big = _png(20, 20), _png(50, 50, seed=1)
    files = {
        "good.png": good, "big.png": big,
        "bomb_huge.png": _png_declaring(100_000, 100_000),  # beyond PIL's own guard
        "bomb_big.png": _png_declaring(12_000, 10_000),  # under PIL's guard, over pzscale's default limit
        "truncated.png": big[: len(big) // 2], "truncated.jpg": _jpeg(64, 48)[:300],
    }
    for name, data in files.items():
        (tree / name).write_bytes(data)
        tally.hostile_input(f"image {name}")
    url = str(tmp_path / "cat.zarr")
    ingest([str(tmp_path / "tree")], url, shard_len=64, client=client, progress=False)
    rows = _rows(url, "original_path", "status", "error")
    by_name = {p.rsplit("/", 1)[-1]: (s, e) for p, s, e in zip(*rows.values(), strict=True)}
    assert tally.check_rows(list(by_name), list(files)) == (0, 0)
    assert by_name["good.png"] == ("ok", "") and by_name["big.png"] == ("ok", "")
    assert by_name["bomb_huge.png"][0] == "decode_error" and "decompression bomb" in by_name["bomb_huge.png"][1]
    assert by_name["bomb_big.png"] == ("decode_error", "ValueError: image declares 12000 x 10000 = 120,000,000 "
                                       "pixels, over the limit of 100,000,000 (PZSCALE_MAX_IMAGE_PIXELS): "
                                       "a decompression bomb?")
    for name in ("truncated.png", "truncated.jpg"):
        assert by_name[name][0] == "decode_error" and by_name[name][1], by_name[name]
    # the limit is the caller's: 1,000 pixels refuses the 50 x 50 image too, on the workers
    strict = str(tmp_path / "strict.zarr")
    ingest([str(tmp_path / "tree")], strict, shard_len=64, client=client, progress=False,
           limits=Limits(max_image_pixels=1000))
    rows = _rows(strict, "original_path", "status", "error")
    by_name = {p.rsplit("/", 1)[-1]: (s, e) for p, s, e in zip(*rows.values(), strict=True)}
    assert by_name["good.png"] == ("ok", "") and by_name["big.png"][0] == "decode_error"
    assert "50 x 50 = 2,500 pixels, over the limit of 1,000" in by_name["big.png"][1]


def _zip_bomb(path, member_bytes: int) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("imgs/A/good.png", _png(20, 20))
        zf.writestr("imgs/A/bomb.png", b"\0" * member_bytes)


def test_zip_with_an_extreme_ratio_is_refused_before_any_write(client, tmp_path, tally):
    archive = tmp_path / "bomb.zip"
    _zip_bomb(archive, 8 << 20)  # 8 MiB of zeros deflate to ~8 KB
    tally.hostile_input("zip member with a ~1000:1 ratio")
    url = tmp_path / "cat.zarr"
    with pytest.raises(InputError, match=r"bomb\.zip: member 'imgs/A/bomb\.png' expands 1,0\d\d times .* over the "
                                         r"limit of 200 \(PZSCALE_MAX_COMPRESSION_RATIO\)"):
        ingest([str(archive)], str(url), client=client, progress=False)
    assert not url.exists()
    # a caller who trusts the archive raises the limit: the member is then a row that does not decode
    report = ingest([str(archive)], str(url), client=client, progress=False,
                    limits=Limits(max_compression_ratio=5000))
    assert report.status == {"ok": 1, "decode_error": 1}


def test_ecotaxa_zip_with_a_bomb_table_or_image(tmp_path, tally):
    """A bomb table is that zip's reported problem (other tables go through); a bomb image is its row's."""
    reader = readers.get("ecotaxa")
    header = "img_file_name\tobject_id\n"
    good_table = (header + "a.png\tobj_a\nbomb.png\tobj_b\n").encode()
    with zipfile.ZipFile(tmp_path / "export.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("set1/ecotaxa_set1.tsv", good_table)
        zf.writestr("set1/a.png", _png(20, 20))
        zf.writestr("set1/bomb.png", b"\0" * (8 << 20))
    with zipfile.ZipFile(tmp_path / "bomb_table.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ecotaxa_big.tsv", header.encode() + b"\t" * (8 << 20))
    tally.hostile_input("EcoTaxa zip with a ~1000:1 image member")
    tally.hostile_input("EcoTaxa zip with a ~1000:1 table")
    items = reader.plan(str(tmp_path))
    by_zip = {item.info["container"].rsplit("/", 1)[-1]: item for item in items}
    bad = by_zip["bomb_table.zip"]
    assert bad.rows == 0 and "ecotaxa_big.tsv' expands" in bad.error and "PZSCALE_MAX_COMPRESSION_RATIO" in bad.error
    table = reader.read(by_zip["export.zip"], 0, 2).to_pylist()
    assert table[0]["image"]["bytes"] == _png(20, 20) and table[0]["image_error"] == ""
    assert table[1]["image"]["bytes"] is None and "member 'set1/bomb.png' expands" in table[1]["image_error"]


def test_tar_gz_bomb_and_oversized_members_are_refused(tmp_path, tally):
    folder = readers.get("folder")
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as tar:
        for name, data in (("imgs/A/good.png", _png(20, 20)), ("imgs/A/zeros.png", b"\0" * (8 << 20)),
                           ("imgs/A/good2.png", _png(20, 20, seed=2))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tally.hostile_input("tar.gz whose stream expands ~1000:1")
    with pytest.raises(InputError, match=r"bomb\.tar\.gz: the gzip stream expands [\d,]+ times"):
        folder.plan(str(bomb))
    big = tmp_path / "big.tar"
    with tarfile.open(big, "w") as tar:
        info = tarfile.TarInfo("imgs/A/big.png")
        info.size = 2 << 20
        tar.addfile(info, io.BytesIO(b"\1" * info.size))
    tally.hostile_input("tar member over the member-size limit")
    with using(Limits(max_member_bytes=1 << 20)), pytest.raises(
            InputError, match=r"member 'imgs/A/big\.png' expands to 2,097,152 bytes, over the limit of 1,048,576"):
        folder.plan(str(big))
    assert folder.plan(str(big))[0].rows == 1  # within the default limits


def test_webdataset_shard_with_unsafe_members_is_refused(tmp_path, tally):
    reader = readers.get("webdataset")
    for name, kind in (("../sample_0.png", tarfile.REGTYPE), ("/abs/sample_0.png", tarfile.REGTYPE),
                       ("sample_0.png", tarfile.SYMTYPE)):
        shard = tmp_path / f"shard_{len(os.listdir(tmp_path)):05d}.tar"
        with tarfile.open(shard, "w") as tar:
            for member, data in (("sample_1.png", _png(8, 8)), ("sample_1.txt", b"animalia")):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            info.size = 0
            tar.addfile(info, io.BytesIO(b""))
        tally.hostile_input(f"WebDataset member {name!r} ({'link' if kind == tarfile.SYMTYPE else 'file'})")
        with pytest.raises(InputError, match=r"unsafe member"):
            reader.plan(str(shard))
        shard.unlink()


# ---------------------------------------------------------------- wrong column types


def test_parquet_with_wrong_column_types(small_synth, client, tmp_path, tally):
    table = pq.read_table(sorted(small_synth.glob("*.parquet"))[0]).slice(0, 4)
    messy = table.set_column(table.schema.get_field_index("Latitude"), "Latitude",
                             pa.array(["12.5", "north", "", "95"]))
    messy = messy.set_column(messy.schema.get_field_index("Longitude"), "Longitude",
                             pa.array([float("inf"), float("nan"), -200.0, 10.0]))
    messy = messy.set_column(messy.schema.get_field_index("plankton"), "plankton", pa.array(["yes", "no", "1", None]))
    messy = messy.set_column(messy.schema.get_field_index("Depth_min"), "Depth_min", pa.array([5, 6, 7, 8]))
    (tmp_path / "messy").mkdir()
    pq.write_table(messy, tmp_path / "messy" / "part.parquet")
    tally.hostile_input("parquet with text latitudes, inf/NaN/out-of-range longitudes, text booleans, int depths")
    url = str(tmp_path / "cat.zarr")
    ingest([str(tmp_path / "messy")], url, shard_len=64, client=client, progress=False)
    rows = _rows(url, "image_id", "lat", "lon", "qc", "plankton", "depth_min")
    assert tally.check_rows(rows["image_id"], [f"{d}:{o}" for d, o in zip(table["dataset"].to_pylist(),
                                                                          table["ObjID"].to_pylist(), strict=True)]) \
        == (0, 0)
    assert np.isnan(rows["lat"]).all()  # 12.5 with an inf longitude is no position either
    assert [q.split(";") for q in rows["qc"]] == [["position_out_of_range"], ["lat_unparsed"],
                                                  ["position_out_of_range"], ["position_out_of_range"]]
    assert list(rows["plankton"]) == [True, False, True, False]
    np.testing.assert_array_equal(rows["depth_min"], [5, 6, 7, 8])
    nested = table.set_column(table.schema.get_field_index("Latitude"), "Latitude",
                              pa.array([[1.0], [2.0], [], None], pa.list_(pa.float64())))
    (tmp_path / "nested").mkdir()
    pq.write_table(nested, tmp_path / "nested" / "part.parquet")
    tally.hostile_input("parquet with a list-typed Latitude column")
    url = tmp_path / "nested.zarr"
    with pytest.raises(InputError, match=r"part\.parquet: column 'Latitude' is list<.*double>, expected text, "
                                         r"a number"):
        ingest([str(tmp_path / "nested")], str(url), client=client, progress=False)
    assert not url.exists()


# ---------------------------------------------------------------- a checkpoint that runs code, on the workers


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_checkpoint_is_refused_on_the_workers(small_clean, client, tmp_path, tally):
    """The stage path (the model loaded by a worker plugin), not only models.load_model in this process."""
    marker = tmp_path / "payload_ran"
    model_dir = tmp_path / "evil_model"
    card = models.ModelCard(name="evil", version="1", kind="builtin", architecture="pzcnn-small", embed_dim=16,
                            image_size=48, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    models.save_model(model_dir, card, models.builtin_backbone(16))
    torch.save({"state_dict": models.builtin_backbone(16).state_dict(), "extra": _RunsCode(marker)},
               model_dir / "backbone.pt")
    card.weights = {"backbone": "backbone.pt"}
    card.save(model_dir)
    tally.hostile_input("pickled checkpoint whose unpickling would run code, loaded by the embed stage")
    url = str(tmp_path / "cat.zarr")
    shutil.copytree(small_clean[0], url)
    with pytest.raises(ModelError, match=r"backbone\.pt: refused: the checkpoint needs arbitrary code"):
        embed(url, str(model_dir), client=client, progress=False)
    assert not marker.exists()
    assert not catalog.stages_done(url).get(f"embed/{card.id}")
    # unregistered, or every worker started later (a nanny's restart too) would load it again
    registered = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.worker_plugins))
    assert not [name for name in registered if "evil_model" in name]
