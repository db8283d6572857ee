import numpy as np
import pytest

from pzscale import catalog
from pzscale.errors import CatalogError, ShardAlignmentError
from pzscale.schema import BY_NAME, COORDINATES, VARIABLE_NAMES
from pzscale.synth import encode


def _columns(n, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    cols = {}
    for name in VARIABLE_NAMES:
        var = BY_NAME[name]
        if var.dtype == "str":
            cols[name] = np.array([f"{name}-{seed}-{i}" for i in range(n)], dtype=object)
        elif var.dtype == "bytes":
            arrs = [rng.integers(0, 256, (5 + i % 7, 9), dtype=np.uint8) for i in range(n)]
            cols[name] = np.array([encode(Image.fromarray(a), "PNG") for a in arrs], dtype=object)
        else:
            cols[name] = np.arange(n).astype(var.dtype)
    return cols


def test_shard_ranges():
    assert catalog.shard_ranges(0, 10, 4) == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    assert catalog.shard_ranges(6, 13, 4) == [(1, 6, 8), (2, 8, 12), (3, 12, 13)]
    assert catalog.shard_ranges(5, 5, 4) == []


@pytest.mark.parametrize("start,stop", [(0, 3), (2, 4), (4, 9), (8, 8), (1, 10)])
def test_check_aligned_refuses_partial_shards(start, stop):
    with pytest.raises(ShardAlignmentError, match="not whole shards"):
        catalog.check_aligned(start, stop, 10, 4)


def test_create_write_read_roundtrip(tmp_path):
    url = str(tmp_path / "c.zarr")
    group = catalog.create(url, n_rows=150, shard_len=64)
    cols = _columns(150)
    for _, start, stop in catalog.shard_ranges(0, 150, 64):
        catalog.write_rows(group, start, stop, {k: v[start:stop] for k, v in cols.items()})
    with pytest.raises(ShardAlignmentError):
        catalog.write_rows(group, 10, 64, {k: v[10:64] for k, v in cols.items()})
    ds = catalog.open_catalog(url)
    assert list(ds.data_vars) == [n for n in VARIABLE_NAMES if n not in COORDINATES]
    assert set(ds.coords) == set(COORDINATES)
    assert ds.sizes["image"] == 150
    assert ds["image_id"].chunks[0] == (64, 64, 22)
    assert ds["image_id"].values[149] == "image_id-0-149"
    rows = [149, 0, 70, 70]
    from_url = catalog.read_images(url, rows)
    from_ds = catalog.read_images(ds, rows)
    subset = catalog.read_images(ds.isel(image=slice(70, None)), [0])  # positions in the subset
    for got, want in zip(from_url, [catalog.images.decode(cols["image_bytes"][r]) for r in rows], strict=True):
        np.testing.assert_array_equal(got, want)
    for a, b in zip(from_url, from_ds, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(subset[0], from_url[2])


def test_write_needs_every_variable(tmp_path):
    group = catalog.create(str(tmp_path / "c.zarr"), n_rows=64, shard_len=64)
    cols = _columns(64)
    del cols["lat"]
    with pytest.raises(CatalogError, match="lacks variables \\['lat'\\]"):
        catalog.write_rows(group, 0, 64, cols)


def test_checksums_see_every_change(tmp_path):
    url = str(tmp_path / "c.zarr")
    group = catalog.create(url, n_rows=64, shard_len=64)
    catalog.write_rows(group, 0, 64, _columns(64))
    before = catalog.checksums(url)
    cols = _columns(64)
    cols["lat"][5] = 99.0
    catalog.write_rows(group, 0, 64, cols)
    after = catalog.checksums(url)
    assert {k for k in before if before[k] != after[k]} == {"lat"}


def test_markers(tmp_path):
    url = str(tmp_path / "c.zarr")
    catalog.create(url, n_rows=10, shard_len=64)
    assert catalog.done_shards(url, "ingest/abc") == set()
    catalog.mark_done(url, "ingest/abc", 3, {"rows": [192, 256]})
    catalog.mark_done(url, "ingest/abc", 0, {"rows": [0, 64]})
    catalog.mark_done(url, "embed", 0, {})
    assert catalog.done_shards(url, "ingest/abc") == {0, 3}
    assert catalog.stages_done(url) == {"ingest/abc": {0, 3}, "embed": {0}}


def test_bad_urls_and_layouts(tmp_path):
    with pytest.raises(CatalogError, match="unknown URL scheme 'nosuch://'"):
        catalog.check_url("nosuch://bucket/x.zarr")
    with pytest.raises(CatalogError, match="no catalog here"):
        catalog.open_group(str(tmp_path / "missing.zarr"))
    with pytest.raises(CatalogError, match="multiple of 256"):
        catalog.create(str(tmp_path / "odd.zarr"), n_rows=10, shard_len=300)
    url = str(tmp_path / "c.zarr")
    group = catalog.create(url, n_rows=128, shard_len=64)
    with pytest.raises(CatalogError, match="already exists"):
        catalog.create(url, n_rows=128, shard_len=64)
    group["lat"].resize((200,))
    with pytest.raises(CatalogError, match="array lat has shape"):
        catalog.open_group(url)


@pytest.mark.parametrize("value", [[1, 2], "not json", '["a list"]', 7])
def test_a_damaged_group_attribute_is_one_line_not_a_traceback(tmp_path, value):
    from typer.testing import CliRunner

    from pzscale.cli import app

    url = str(tmp_path / "c.zarr")
    group = catalog.create(url, n_rows=10, shard_len=64)
    group.attrs["pzscale"] = value
    with pytest.raises(CatalogError, match="'pzscale' is not a JSON object: a damaged catalog"):
        catalog.open_group(url)
    result = CliRunner().invoke(app, ["info", url])
    assert result.exit_code == 1 and result.output.startswith(f"error: {url}: the group attribute 'pzscale'")
