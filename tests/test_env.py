"""The env stage on a real LocalCluster: values, QC, attributes, markers, reruns, changed
parameters, the COBE acceptance values through the catalog, grids and catalog on S3, and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from pzscale import catalog, grids, open_catalog
from pzscale.cli import app
from pzscale.env import env, names, parse_variables
from pzscale.errors import CatalogError, InputError
from pzscale.grids import Grid, JoinOptions
from pzscale.ingest import ingest
from pzscale.schema import TIME_FILL
from pzscale.synth import synth

pytestmark = [pytest.mark.cluster]

COBE = "nctoolkit/sst.mon.ltm.1981-2010.nc"
BASIN = "xarray-data/basin_mask.nc"
# grids.md section 2: lat, lon, month, COBE LTM sst, basin code at the surface (Skagerrak: land -> nearest ocean)
SAMPLES = [(33.4213, -121.6240, 6, 15.24, 2), (18.0, -24.4167, 4, 22.33, 1), (-44.7254, 145.5351, 4, 13.78, 3),
           (47.846, -15.437, 6, 15.18, 1), (57.7282, 11.4682, 9, 15.23, 1)]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A 4-degree synthetic grid over the synthetic catalog's years (2019-2022)."""
    return grids.synthetic_grid(tmp_path_factory.mktemp("grid") / "grid.nc", resolution=4.0, months=48)


@pytest.fixture(scope="module")
def small_catalog(client, tmp_path_factory):
    """A synthetic catalog of 320 images in 5 shards (positions, depths, times; some without)."""
    work = tmp_path_factory.mktemp("envcat")
    synth(work / "parquet", images=320, seed=3, rows_per_file=320)
    url = str(work / "catalog.zarr")
    ingest([str(work / "parquet")], url, shard_len=64, client=client, progress=False)
    return url


@pytest.fixture
def catalog_copy(small_catalog, tmp_path):
    url = str(tmp_path / "catalog.zarr")
    shutil.copytree(small_catalog, url)
    return url


def expected_join(url: str, grid_path: str, variable: str, options: JoinOptions | None = None):
    """The kernel on the catalog's own columns (the kernel itself is checked against numpy in test_grids)."""
    group = catalog.open_group(url)
    cols = catalog.read_rows(group, 0, catalog.n_rows_of(group), ["lat", "lon", "depth_min", "depth_max", "time"])
    with Grid.open(grid_path, variable, options=options) as g:
        return g.join(cols["lat"], cols["lon"], depth_min=cols["depth_min"], depth_max=cols["depth_max"],
                      time=cols["time"])


def test_env_writes_values_qc_attrs_and_markers_and_resumes(client, catalog_copy, grid):
    url = catalog_copy
    report = env(url, grid, ["sst", "temp=thetao", "so"], client=client, progress=False)
    n_shards = report.shards_total
    assert report.shards_written == n_shards and report.rows_computed == catalog.n_rows_of(catalog.open_group(url))
    ds = open_catalog(url)
    for name, variable in (("sst", "sst"), ("temp", "thetao"), ("so", "so")):
        values, qc = expected_join(url, grid, variable)
        np.testing.assert_array_equal(ds[f"env_{name}"].values, values)
        np.testing.assert_array_equal(grids.qc_names(ds[f"env_{name}_qc"].values), qc)
        assert ds[f"env_{name}"].dtype == np.float32
        assert catalog.done_shards(url, f"env/{name}") == set(range(n_shards))
    lat = ds["lat"].values
    depth_known = np.isfinite(ds["depth_min"].values)
    sst_qc, temp_qc = grids.qc_names(ds["env_sst_qc"].values), grids.qc_names(ds["env_temp_qc"].values)
    assert (sst_qc[np.isnan(lat)] == "no_position").all() and (sst_qc[~np.isnan(lat)] != "no_position").all()
    assert ((temp_qc == "no_position") == (np.isnan(lat) | ~depth_known)).all()
    assert (sst_qc == "ok").sum() > 0.5 * np.isfinite(lat).sum()
    ok = sst_qc == "ok"
    assert np.isfinite(ds["env_sst"].values[ok]).all() and np.isnan(ds["env_sst"].values[~ok]).all()
    attrs = ds["env_sst"].attrs
    assert attrs["units"] == "degC" and attrs["source_units"] == "K" and attrs["variable"] == "sst"
    assert attrs["grid"] == grid  # nested mappings are flattened so that netCDF can store them
    assert [attrs[f"tolerances_{axis}"] for axis in ("lat", "lon", "time_days")] == [4.0, 4.0, 31.0]
    assert ds["env_temp"].attrs["variable"] == "thetao" and ds["env_so"].attrs["units"] == "1e-3"
    qc_attrs = ds["env_sst_qc"].attrs
    assert ds["env_sst_qc"].dtype == np.int8 and qc_attrs["flag_values"] == [-1, 0, 1, 2, 3, 4]
    assert qc_attrs["flag_meanings"].split() == ["not_joined", *grids.QC_VALUES]
    record = catalog.metadata(catalog.open_group(url))["stages"]["env/temp"]
    assert record["variable"] == "thetao" and record["options"]["depth"] == "nearest"

    again = env(url, grid, ["sst", "temp=thetao", "so"], client=client, progress=False)
    assert again.shards_written == 0 and again.shards_skipped == n_shards

    tight = JoinOptions(time_tolerance_days=1.0)  # mid-month steps: most images fall out of range
    with pytest.raises(CatalogError, match="env_sst was joined .* overwrite"):
        env(url, grid, ["sst"], options=tight, client=client, progress=False)
    redone = env(url, grid, ["sst"], options=tight, client=client, progress=False, overwrite=True)
    assert redone.shards_written == n_shards
    ds = open_catalog(url)
    values, qc = expected_join(url, grid, "sst", tight)
    np.testing.assert_array_equal(grids.qc_names(ds["env_sst_qc"].values), qc)
    np.testing.assert_array_equal(ds["env_sst"].values, values)
    assert (qc == "out_of_range").sum() > (sst_qc == "out_of_range").sum()
    np.testing.assert_array_equal(ds["env_temp"].values, expected_join(url, grid, "thetao")[0])  # untouched
    assert ds["env_sst"].attrs["tolerances_time_days"] == 1.0


def test_a_worker_opens_the_grid_once_for_all_its_shards_and_again_once_rewritten(client, catalog_copy, tmp_path):
    path = str(tmp_path / "grid.nc")
    grids.synthetic_grid(path, resolution=4.0, months=48)
    client.run(lambda: grids._OPENED.clear())
    before = client.run(lambda: grids._OPENED.opens)
    report = env(catalog_copy, path, ["sst", "temp=thetao"], client=client, progress=False)
    assert report.shards_written == report.shards_total >= 4
    opened = {w: n - before[w] for w, n in client.run(lambda: grids._OPENED.opens).items()}
    assert all(n <= 1 for n in opened.values()) and 1 <= sum(opened.values()) < report.shards_total
    first = open_catalog(catalog_copy)["env_sst"].values
    grids.synthetic_grid(path, resolution=5.0, months=48)  # other cells, other values
    for shard in catalog.done_shards(catalog_copy, "env/sst"):  # same parameters: done unless its markers go
        (Path(catalog_copy) / catalog.PRIVATE / "done" / "env" / "sst" / f"{shard:06d}.json").unlink()
    env(catalog_copy, path, ["sst"], client=client, progress=False)
    reopened = {w: n - before[w] - opened[w] for w, n in client.run(lambda: grids._OPENED.opens).items()}
    assert sum(reopened.values()) >= 1  # the rewritten file is not served from the workers' caches
    ds = open_catalog(catalog_copy)
    values, qc = expected_join(catalog_copy, path, "sst")
    np.testing.assert_array_equal(ds["env_sst"].values, values)
    np.testing.assert_array_equal(grids.qc_names(ds["env_sst_qc"].values), qc)
    assert not np.array_equal(values, first, equal_nan=True)


def test_cobe_samples_and_a_land_fill_through_the_catalog(client, catalog_copy, sample_data):
    url = catalog_copy
    group = catalog.open_group(url, mode="r+")
    shard_len = catalog.metadata(group)["shard_len"]
    cols = catalog.read_rows(group, 0, shard_len, ["lat", "lon", "depth_min", "depth_max", "time"])
    for i, (lat, lon, month, *_) in enumerate(SAMPLES):
        cols["lat"][i], cols["lon"][i] = lat, lon
        cols["depth_min"][i] = cols["depth_max"][i] = 0.0
        cols["time"][i] = np.datetime64(f"2021-{month:02d}-03T10:00", "ms").astype(np.int64)
    cols["time"][len(SAMPLES)] = TIME_FILL  # a located image without a time
    catalog.write_arrays(group, 0, shard_len, cols)
    env(url, str(sample_data / COBE), {"sst": "sst"}, client=client, progress=False)
    env(url, str(sample_data / BASIN), ["basin"], options=JoinOptions(land_fill_km=200), client=client,
        progress=False)
    ds = open_catalog(url).isel(image=slice(0, len(SAMPLES) + 1))
    np.testing.assert_allclose(ds["env_sst"].values[:5], [s[3] for s in SAMPLES], atol=0.01)
    sst_qc = grids.qc_names(ds["env_sst_qc"].values)
    assert sst_qc.tolist() == ["ok"] * 5 + ["no_position" if np.isfinite(cols["lat"][5]) else "no_position"]
    np.testing.assert_array_equal(ds["env_basin"].values[:5], [s[4] for s in SAMPLES])
    assert grids.qc_names(ds["env_basin_qc"].values)[:5].tolist() == ["ok"] * 4 + ["land_filled"]
    assert ds["env_sst"].attrs["time_method"] == "month of year (climatology)"


def test_bad_variables_and_grids_fail_before_any_write(client, catalog_copy, grid, sample_data):
    with pytest.raises(InputError, match="no variable 'chlor'"):
        env(catalog_copy, grid, ["chlor"], client=client, progress=False)
    with pytest.raises(InputError, match="dimension 'N_PROF' .* is not lat, lon, depth or time"):
        env(catalog_copy, str(sample_data / "tidync/MD5903593_001.nc"), ["thetao"], client=client,  # Argo profiles
            progress=False)
    with pytest.raises(InputError, match=r"SOURCE\.txt: not a NetCDF or Zarr grid"):
        env(catalog_copy, str(sample_data / "tidync/SOURCE.txt"), ["sst"], client=client, progress=False)
    with pytest.raises(InputError, match="bad variable spec"):
        parse_variables(["2x=sst"])
    assert not any(str(name).startswith("env_") for name, _ in catalog.open_group(catalog_copy).arrays())
    assert names("sst") == {"value": "env_sst", "qc": "env_sst_qc", "stage": "env/sst"}


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "envkey", "secret": "env-secret-9d1f", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir("envbucket")
    yield options
    server.stop()


def test_grids_on_s3_zarr_in_place_and_netcdf_fetched(client, moto, catalog_copy, grid):
    """The grid on object storage (moto on 127.0.0.1), opened inside each task with its storage options."""
    import s3fs

    so, url = moto, catalog_copy
    zarr_grid = grids.synthetic_grid("s3://envbucket/grid.zarr", resolution=4.0, months=48, storage_options=so)
    s3fs.S3FileSystem(skip_instance_cache=True, **so).put_file(grid, "envbucket/grid.nc")
    report = env(url, zarr_grid, ["sst", "thetao"], client=client, grid_storage_options=so, progress=False)
    assert report.shards_written == report.shards_total == 5
    ds = open_catalog(url)
    cols = {k: ds[k].values for k in ("lat", "lon", "depth_min", "depth_max", "time")}
    with Grid.open("s3://envbucket/grid.nc", "thetao", storage_options=so) as remote_nc:
        values, qc = remote_nc.join(cols["lat"], cols["lon"], depth_min=cols["depth_min"],
                                    depth_max=cols["depth_max"], time=cols["time"])
    np.testing.assert_array_equal(ds["env_thetao"].values, values)  # the same grid as Zarr and as NetCDF
    np.testing.assert_array_equal(grids.qc_names(ds["env_thetao_qc"].values), qc)
    assert (qc == "ok").any() and ds["env_thetao"].attrs["grid"] == "s3://envbucket/grid.zarr"
    group_attrs = json.dumps(catalog.metadata(catalog.open_group(url)))
    assert so["secret"] not in group_attrs and so["key"] not in group_attrs


def test_cli_env(client, catalog_copy, grid):
    runner = CliRunner()
    result = runner.invoke(app, ["env", "--catalog", catalog_copy, "--grid", grid, "--var", "sst", "--var",
                                 "chl=chlor_a", "--land-fill-km", "300", "--scheduler", client.scheduler.address])
    assert result.exit_code == 0, result.output
    assert "env/sst,chl" in result.output
    ds = open_catalog(catalog_copy)
    assert ds["env_chl"].attrs["variable"] == "chlor_a" and ds["env_chl"].attrs["land_fill_km"] == 300
    values, _ = expected_join(catalog_copy, grid, "chlor_a", JoinOptions(land_fill_km=300))
    np.testing.assert_array_equal(ds["env_chl"].values, values)
    bad = runner.invoke(app, ["env", "--catalog", catalog_copy, "--grid", grid, "--var", "nothing",
                              "--scheduler", client.scheduler.address])
    assert bad.exit_code == 1 and "no variable 'nothing'" in bad.output
    assert json.loads(json.dumps(xr.open_zarr(catalog_copy, consolidated=False)["env_sst"].attrs))["grid"] == grid


def as_layout_1(url: str, name: str, unjoined_shard: int) -> np.ndarray:
    """Rewrite ``name`` as an older pzscale stored it (QC strings, layout 1, no ``sample`` variable), one shard
    never joined (""); returns the strings."""
    group = catalog.open_group(url, mode="r+", layouts=(1, catalog.LAYOUT_VERSION), check=False)
    attrs = {k: v for k, v in group[name].attrs.asdict().items() if k not in ("flag_values", "flag_meanings")}
    names = grids.qc_names(group[name][:])
    shard_len = catalog.metadata(group)["shard_len"]
    names[unjoined_shard * shard_len:(unjoined_shard + 1) * shard_len] = ""
    del group[name]
    catalog.ensure_array(group, name, dtype="str", fill="", attrs={**attrs, "flag_values": list(grids.QC_VALUES)})
    for _, start, stop in catalog.shard_ranges(0, len(names), shard_len):
        if start // shard_len != unjoined_shard:
            catalog.write_arrays(group, start, stop, {name: names[start:stop].astype(str)})
    if "sample" in group:
        del group["sample"]
    catalog.update_metadata(group, layout=1)
    return names


def test_migrate_turns_layout_1_qc_strings_into_flag_codes_and_resumes_after_a_stop(client, catalog_copy, grid,
                                                                                     monkeypatch):
    from pzscale import migrate as migration

    url = catalog_copy
    env(url, grid, ["sst", "temp=thetao"], client=client, progress=False)
    before = {name: open_catalog(url)[name].attrs for name in ("env_sst_qc", "env_temp_qc")}
    strings = {name: as_layout_1(url, name, unjoined_shard=2) for name in ("env_sst_qc", "env_temp_qc")}
    with pytest.raises(CatalogError, match="layout 1.*pzscale migrate"):
        open_catalog(url)

    calls = {"n": 0}
    copy = migration._copy

    def stops_on_second_copy(*args):  # env_sst_qc: codes written to the side array, then a stop while copying back
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("connection lost")
        return copy(*args)

    monkeypatch.setattr(migration, "_copy", stops_on_second_copy)
    with pytest.raises(OSError):
        migration.migrate(url)
    monkeypatch.setattr(migration, "_copy", copy)
    with pytest.raises(CatalogError, match="layout 1"):  # not raised until every array is migrated
        open_catalog(url)
    result = CliRunner().invoke(app, ["migrate", "--catalog", url])
    assert result.exit_code == 0, result.output
    assert f"layout 1 -> {catalog.LAYOUT_VERSION}" in result.output and "sample added" in result.output

    ds = open_catalog(url)
    assert not [v for v in catalog.open_group(url).array_keys() if v.startswith(migration.SIDE)]
    assert (ds["sample"].values == "").all()  # unknown for rows ingested before layout 3
    for name, expected in strings.items():
        assert ds[name].dtype == np.int8
        np.testing.assert_array_equal(grids.qc_names(ds[name].values), expected)
        assert (ds[name].values[128:192] == grids.QC_NOT_JOINED).all()
        assert ds[name].attrs["flag_meanings"].split() == ["not_joined", *grids.QC_VALUES]
        kept = ("grid", "variable")
        assert {k: ds[name].attrs[k] for k in kept} == {k: before[name][k] for k in kept}
    again = CliRunner().invoke(app, ["migrate", "--catalog", url])
    assert again.exit_code == 0 and "nothing to do" in again.output
    # the stage's done markers survive the migration: a rerun of env finds every shard done
    report = env(url, grid, ["sst", "temp=thetao"], client=client, progress=False)
    assert report.shards_written == 0


def test_qc_codes_and_names_round_trip_and_refuse_unknown_values():
    names = np.array(["ok", "", "land_filled", "no_position", "out_of_range", "no_data"], dtype=object)
    codes = grids.qc_codes(names)
    assert codes.dtype == np.int8 and codes.tolist() == [0, -1, 2, 4, 1, 3]
    assert grids.qc_names(codes).tolist() == names.tolist()
    with pytest.raises(ValueError, match="unknown QC values"):
        grids.qc_codes(np.array(["ok", "fine"]))
    with pytest.raises(ValueError, match="between"):
        grids.qc_names(np.array([5], np.int8))
