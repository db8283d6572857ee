"""A catalog at the default shard length, opened the way a Pangeo user opens any Zarr store:
``xr.open_zarr(url, consolidated=True)``, with no pzscale import on the reading side."""

from __future__ import annotations

import json

import cf_xarray  # noqa: F401  (registers the .cf accessor)
import netCDF4
import numpy as np
import pytest
import xarray as xr

from pzscale import catalog
from pzscale.dedup import dedup
from pzscale.ingest import ingest
from pzscale.synth import synth

N = 5000  # two Zarr chunks of the default shard (4096 + 904 rows)


@pytest.fixture(scope="module")
def default_catalog(tmp_path_factory, client):
    root = tmp_path_factory.mktemp("default")
    synth(root / "shards", images=N, seed=3, rows_per_file=2500)
    url = str(root / "catalog.zarr")
    ingest([str(root / "shards")], url, client=client, progress=False)  # default shard length
    return url


def _uniform_chunks(ds: xr.Dataset) -> dict:
    """``ds.chunks`` raises "inconsistent chunks" when two variables chunk ``image`` differently."""
    return dict(ds.chunks)


def test_plain_xarray_opens_consolidated_with_uniform_chunks_and_cf_coordinates(default_catalog):
    ds = xr.open_zarr(default_catalog, consolidated=True)
    assert json.loads(ds.attrs["pzscale"])["shard_len"] == catalog.DEFAULT_SHARD_LEN == 16384
    assert _uniform_chunks(ds)["image"] == (4096, N - 4096)
    assert ds["image_bytes"].chunks == ds["lat"].chunks
    assert ds.attrs["Conventions"].startswith("CF-") and ds.attrs["featureType"] == "point"
    assert {"lat", "lon", "time", "depth_min", "depth_max"} <= set(ds.coords)
    for name, standard, axis in [("lat", "latitude", "Y"), ("lon", "longitude", "X"), ("time", "time", "T"),
                                 ("depth_min", "depth", "Z")]:
        attrs = ds[name].attrs
        assert attrs["standard_name"] == standard and attrs["axis"] == axis and attrs["long_name"], name
        assert name == "time" or attrs["units"], name
    assert ds["time"].dtype.kind == "M" and ds["depth_min"].attrs["positive"] == "down"
    assert ds.cf.axes == {"X": ["lon"], "Y": ["lat"], "Z": ["depth_min"], "T": ["time"]}
    assert ds.cf["latitude"].name == "lat"


def test_dask_dataframe_and_netcdf_subset(default_catalog, tmp_path):
    ds = xr.open_zarr(default_catalog, consolidated=True)
    frame = ds.drop_vars("image_bytes").to_dask_dataframe()
    assert frame.npartitions == 2 and len(frame) == N
    counts = frame.groupby("source")["image_id"].count().compute()
    assert counts.sum() == N and set(counts.index) == set(np.unique(ds["source"].values))
    subset = ds.drop_vars("image_bytes").isel(image=slice(100, 300))
    subset.to_netcdf(tmp_path / "subset.nc")
    with netCDF4.Dataset(tmp_path / "subset.nc") as nc:  # a reader that knows nothing of xarray
        assert nc.Conventions.startswith("CF-") and nc.variables["lat"].standard_name == "latitude"
        assert "lat" in nc.variables["source"].coordinates
    back = xr.open_dataset(tmp_path / "subset.nc")
    np.testing.assert_array_equal(back["lat"].values, subset["lat"].values)
    np.testing.assert_array_equal(back["time"].values, subset["time"].values)
    assert list(back["image_id"].values) == list(subset["image_id"].values)


def test_consolidated_metadata_follows_a_stage_that_adds_arrays(default_catalog, client, tmp_path):
    import shutil

    url = str(tmp_path / "copy.zarr")
    shutil.copytree(default_catalog, url)
    dedup(url, methods="exact", client=client, progress=False)
    plain = xr.open_zarr(url, consolidated=True)
    listed = xr.open_zarr(url, consolidated=False)
    assert set(plain.variables) == set(listed.variables) and "dup_exact" in plain
    assert all(plain[name].attrs == listed[name].attrs for name in listed.variables)
    assert json.loads(plain.attrs["pzscale"]) == json.loads(listed.attrs["pzscale"])
    assert "dedup" in json.loads(plain.attrs["pzscale"])["stages"]
    # every image variable, stage outputs of several dimensions included, has the same Dask chunks
    assert _uniform_chunks(plain)["image"] == (4096, N - 4096)
    two_d = [name for name in plain.data_vars if plain[name].ndim == 2]
    assert two_d and all(plain[name].chunks[0] == (4096, N - 4096) for name in two_d)
    subset = plain.drop_vars("image_bytes").isel(image=slice(0, 50))
    # stage attributes are netCDF-storable too; netCDF has no float16 (embeddings, hash profiles)
    subset = subset.map(lambda v: v.astype("float32") if v.dtype == np.float16 else v, keep_attrs=True)
    subset.to_netcdf(tmp_path / "with_stage_outputs.nc")
    assert xr.open_dataset(tmp_path / "with_stage_outputs.nc")["dup_exact"].attrs == plain["dup_exact"].attrs
