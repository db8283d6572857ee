"""Nearest-cell lookups on the real grids in tests/data and on synthetic grids, checked
against the values in the grid notes and against an independent brute-force numpy search;
axes recognised the CF way; curvilinear grids (rotated, a regular grid written 2-D, NEMO)
checked against a haversine search over every cell."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import netCDF4
import numpy as np
import pytest
import xarray as xr

from pzscale import grids
from pzscale.errors import InputError
from pzscale.grids import Grid, JoinOptions, TimeAxis

COBE = "nctoolkit/sst.mon.ltm.1981-2010.nc"
BASIN = "xarray-data/basin_mask.nc"
OISST = "ncmeta/stars/reduced.nc"
OSTIA_DAILY = "nctoolkit/2003.nc"
OSTIA_MONTHLY = "iris-sample-data/ostia_monthly.nc"
ATLANTIC = "iris-sample-data/atlantic_profiles.nc"
NEMO = "iris-sample-data/NEMO/nemo_1m_20150101-20150201_grid-T.nc"
SEAWIFS = "ncmeta/S2008001.L3m_DAY_CHL_chlor_a_9km.nc"
ARGO = "tidync/MD5903593_001.nc"
CMEMS_SO = ("copernicus-marine-toolbox/cmems_mod_glo_phy-so_anfc_0.083deg_P1D-m_so_13.00W-5.00E_47.00N-64.00N_"
            "0.49m_2025-09-24-2025-09-25.nc")
IBI = ("copernicus-marine-toolbox/cmems_mod_ibi_phy_my_0.083deg-3D_P1Y-m_thetao_9.83W-9.67W_34.00N-34.17N_"
       "0.51-1.56m_1993-01-01-2021-01-01.nc")

# grids.md section 2: sample, lat, lon, month, COBE LTM sst, basin code at Z=0, OISST 2 deg
SAMPLES = [
    ("UVP5 CCE", 33.4213, -121.6240, 6, 15.24, 2, 14.68),
    ("ZooScan M106 a", 18.0, -24.4167, 4, 22.33, 1, 22.82),
    ("ZooScan M106 b", -44.7254, 145.5351, 4, 13.78, 3, 12.92),
    ("APERO ZooScan", 47.846, -15.437, 6, 15.18, 1, 13.50),
    ("IFCB Skagerrak", 57.7282, 11.4682, 9, 15.23, np.nan, 0.67),
]
LAT = np.array([s[1] for s in SAMPLES])
LON = np.array([s[2] for s in SAMPLES])


def sample_times(year: int) -> np.ndarray:
    return np.array([f"{year}-{s[3]:02d}-17T08:30" for s in SAMPLES], dtype="datetime64[ms]")


def brute_force_nearest(coord: np.ndarray, x: np.ndarray, *, circular: bool = False) -> np.ndarray:
    """Index of the nearest coordinate by comparing every point with every coordinate."""
    diff = x[:, None] - np.asarray(coord, np.float64)[None, :]
    if circular:
        diff = (diff + 180.0) % 360.0 - 180.0
    return np.abs(diff).argmin(axis=1)


def read_raw(path, name: str) -> np.ndarray:
    """A variable as netCDF4 decodes it (mask and scale), NaN where masked: no xarray involved."""
    with netCDF4.Dataset(path) as nc:
        return np.ma.filled(nc[name][:].astype(np.float64), np.nan)


def test_cobe_climatology_year_0001_gives_the_listed_values(sample_data):
    with Grid.open(sample_data / COBE, "sst") as grid:
        assert grid.time is not None and grid.time.climatology and grid.time_mode == "month"
        assert grid.time.calendar == "standard" and grid.units == "degC"
        for year in (1985, 2024):  # any year: a climatology is indexed by month of year
            values, qc = grid.join(LAT, LON, time=sample_times(year))
            np.testing.assert_allclose(values, [s[4] for s in SAMPLES], atol=0.01)
            assert qc.tolist() == ["ok"] * len(SAMPLES)
        _, qc = grid.join(LAT[:2], LON[:2], time=np.array(["NaT", "2020-01-01"], dtype="datetime64[ms]"))
        assert qc.tolist() == ["no_position", "ok"]


def test_land_cell_is_nan_with_a_flag_unless_a_fill_is_asked(sample_data):
    path = sample_data / BASIN
    surface = np.zeros(len(SAMPLES))
    with Grid.open(path, "basin") as grid:
        assert grid.axes == {"lat": "Y", "lon": "X", "depth": "Z"}  # X/Y/Z names, 0..360 longitudes
        values, qc = grid.join(LAT, LON, depth_min=surface, depth_max=surface)
    np.testing.assert_array_equal(values[:4], [s[5] for s in SAMPLES[:4]])
    assert np.isnan(values[4]) and qc.tolist() == ["ok"] * 4 + ["no_data"]
    with Grid.open(path, "basin", options=JoinOptions(land_fill_km=50)) as grid:
        values, qc = grid.join(LAT[4:], LON[4:], depth_min=surface[4:])
    assert np.isnan(values[0]) and qc[0] == "no_data"  # no ocean cell that close
    with Grid.open(path, "basin", options=JoinOptions(land_fill_km=200)) as grid:
        values, qc = grid.join(LAT, LON, depth_min=surface)
    # the nearest ocean cell (58.5 N, 10.5 E, ~103 km away) is Atlantic; the ocean points keep their value
    np.testing.assert_array_equal(values, [2, 1, 3, 1, 1])
    assert qc.tolist() == ["ok"] * 4 + ["land_filled"]


def test_oisst_single_day_is_valid_at_any_time(sample_data):
    with Grid.open(sample_data / OISST, "sst") as grid:  # netCDF-3, packed int16, zlev of one level
        assert grid.time_mode == "none" and grid.depth is None
        values, qc = grid.join(LAT, LON, time=sample_times(2019))
    np.testing.assert_allclose(values, [s[6] for s in SAMPLES], atol=0.005)
    assert set(qc) == {"ok"}


@pytest.mark.parametrize("convention", ["0..360", "-180..180"])
def test_seam_points_either_side_get_the_cell_at_0_and_at_180(tmp_path, convention):
    path = grids.synthetic_grid(tmp_path / "g.nc", resolution=2.0, months=1, depths=(0.0,), lon_convention=convention)
    lon_axis = xr.open_dataset(path, decode_times=False)["lon"].values
    at_zero, at_180 = int(np.flatnonzero(lon_axis == 0.0)[0]), int(np.flatnonzero(np.abs(lon_axis) == 180.0)[0])
    expected = read_raw(path, "chlor_a")[0, brute_force_nearest(read_raw(path, "lat"), np.array([10.2]))[0]]
    with Grid.open(path, "chlor_a") as grid:
        values, qc = grid.join([10.2] * 4, [359.8, -0.2, 179.9, -179.9], time=np.full(4, "2019-01-10", "M8[ms]"))
    assert set(qc) == {"ok"}
    np.testing.assert_array_equal(values, np.float32(expected[[at_zero, at_zero, at_180, at_180]]))


def test_seam_on_a_real_grid_and_a_box_straddling_zero(sample_data):
    oisst = read_raw(sample_data / OISST, "sst")[0, 0]  # lon 0, 2, ..., 358
    with Grid.open(sample_data / OISST, "sst") as grid:
        values, _ = grid.join([0.5, 0.5], [359.8, -0.2])
    assert values[0] == values[1] == np.float32(oisst[45, 0])
    # atlantic_profiles: lon 0.5 then 325.5..355.5 (not monotonic); theta in K; "degrees" units
    theta = read_raw(sample_data / ATLANTIC, "theta")
    with Grid.open(sample_data / ATLANTIC, "thetao") as grid:
        assert grid.name == "theta" and grid.units == "degC" and grid.source_units == "K"
        values, qc = grid.join([-5.0, -5.0, -5.0], [-0.2, 359.0, -30.0], depth_min=np.array([26.0, 26.0, 26.0]))
    lats, lons = read_raw(sample_data / ATLANTIC, "lat"), read_raw(sample_data / ATLANTIC, "lon")
    row = brute_force_nearest(lats, np.array([-5.0]))[0]
    columns = brute_force_nearest(lons, np.array([-0.2, 359.0, -30.0]), circular=True)
    assert columns.tolist() == [0, 0, 2]  # 0.5 E across the seam; 330.5 E
    np.testing.assert_allclose(values, theta[2, row, columns] - 273.15, atol=1e-4)
    assert set(qc) == {"ok"}


def test_coastal_point_takes_the_nearest_ocean_value_only_when_asked(sample_data):
    path = sample_data / CMEMS_SO
    so = read_raw(path, "so")[0, 0]
    lats, lons = read_raw(path, "latitude"), read_raw(path, "longitude")
    land = np.isnan(so)
    coastal = land & ~np.roll(land, 1, axis=1)  # a land cell with an ocean cell to its west
    coastal[:, 0] = False
    iy, ix = np.argwhere(coastal)[len(np.argwhere(coastal)) // 2]
    lat, lon = lats[iy] + 0.01, lons[ix] + 0.01
    when = np.array(["2025-09-24T06:00"], dtype="datetime64[ms]")
    with Grid.open(path, "so") as grid:
        values, qc = grid.join([lat], [lon], time=when, depth_min=np.array([3.0]))
    assert np.isnan(values[0]) and qc[0] == "no_data"
    with Grid.open(path, "so", options=JoinOptions(land_fill_km=30)) as grid:
        values, qc = grid.join([lat], [lon], time=when, depth_min=np.array([3.0]))
    # independent: great-circle distance to every finite cell
    ocean = np.argwhere(~land)
    phi1, phi2 = np.radians(lat), np.radians(lats[ocean[:, 0]])
    dlam = np.radians(lons[ocean[:, 1]] - lon)
    central = np.arccos(np.clip(np.sin(phi1) * np.sin(phi2) + np.cos(phi1) * np.cos(phi2) * np.cos(dlam), -1, 1))
    nearest = ocean[central.argmin()]
    assert qc[0] == "land_filled"
    assert values[0] == np.float32(so[nearest[0], nearest[1]])
    assert central.min() * grids.EARTH_RADIUS_KM < 30


def test_ostia_daily_kelvin_and_time_tolerance_match_numpy(sample_data):
    path = sample_data / OSTIA_DAILY
    raw = read_raw(path, "analysed_sst")
    lats, lons = read_raw(path, "lat"), read_raw(path, "lon")
    with netCDF4.Dataset(path) as nc:
        days = netCDF4.num2date(nc["time"][:], nc["time"].units, only_use_cftime_datetimes=False)
        steps = np.array([np.datetime64(d.isoformat()) for d in days], dtype="datetime64[ms]")
    rng = np.random.default_rng(3)
    n = 2000
    lat, lon = rng.uniform(50.0, 52.0, n), rng.uniform(-15.0, -13.0, n)
    when = steps[0] + rng.integers(0, 364 * 86_400_000, n).astype("timedelta64[ms]")
    with Grid.open(path, "sst") as grid:  # 'sst' finds analysed_sst
        assert grid.name == "analysed_sst" and grid.units == "degC" and grid.time_mode == "nearest"
        values, qc = grid.join(lat, lon, time=when)
        outside, qc_outside = grid.join([51.0, 55.0, 51.0], [-14.0, -14.0, -14.0],
                                        time=np.array(["2004-06-01", "2003-06-01", "NaT"], dtype="datetime64[ms]"))
    t = np.abs((when[:, None] - steps[None, :]).astype(np.int64)).argmin(1)
    expected = raw[t, brute_force_nearest(lats, lat), brute_force_nearest(lons, lon)] - 273.15
    assert set(qc) == {"ok"}
    np.testing.assert_allclose(values, expected, atol=2e-4)
    assert np.isnan(outside).all() and qc_outside.tolist() == ["out_of_range", "out_of_range", "no_position"]


def test_copernicus_salinity_with_a_float32_time_axis_matches_numpy(sample_data):
    path = sample_data / CMEMS_SO
    raw = read_raw(path, "so")
    lats, lons = read_raw(path, "latitude"), read_raw(path, "longitude")
    rng = np.random.default_rng(5)
    n = 3000
    lat, lon = rng.uniform(47.0, 64.0, n), rng.uniform(-13.0, 5.0, n)
    when = np.datetime64("2025-09-23T12:00", "ms") + rng.integers(0, 3 * 86_400_000, n).astype("timedelta64[ms]")
    with Grid.open(path, "so") as grid:
        assert grid.time_mode == "nearest" and grid.depth is None  # one level, 0.49 m: a surface field
        values, qc = grid.join(lat, lon, time=when, depth_min=np.full(n, 10.0))
    step = np.where(when < np.datetime64("2025-09-24T12:00", "ms"), 0, 1)  # steps at 00:00 on 24 and 25 Sep
    late = when > np.datetime64("2025-09-26T00:00", "ms")  # more than the one-day tolerance after the last
    np.testing.assert_array_equal(qc == "out_of_range", late)
    expected = raw[step, 0, brute_force_nearest(lats, lat), brute_force_nearest(lons, lon)]
    ok = qc == "ok"
    assert ok.mean() > 0.5
    np.testing.assert_array_equal(values[ok], expected[ok].astype(np.float32))
    assert np.isnan(expected[qc == "no_data"]).all() and np.isnan(values[~ok]).all()


def test_ibi_cube_nearest_level_and_mean_over_a_depth_range(sample_data):
    path = sample_data / IBI
    raw = read_raw(path, "thetao")  # (29 years, 2 levels 0.506/1.556 m, 3, 3), packed -> float64
    lat, lon = [34.09, 34.09, 34.09, 34.09], [-9.74, -9.74, -9.74, -9.74]
    when = np.array(["1995-03-01", "1995-03-01", "1995-03-01", "1990-01-01"], dtype="datetime64[ms]")
    top, bottom = np.array([0.0, 1.5, 0.0, 0.0]), np.array([0.2, 2.0, 2.0, 0.2])
    with Grid.open(path, "thetao") as grid:
        assert grid.tolerances()["time_days"] == 365.0
        nearest, qc = grid.join(lat, lon, time=when, depth_min=top, depth_max=bottom)
    with Grid.open(path, "thetao", options=JoinOptions(depth="mean")) as grid:
        mean, _ = grid.join(lat, lon, time=when, depth_min=top, depth_max=bottom)
    year = 2  # 1993-07-02, 1994-07-02, 1995-07-02: steps mid-year
    # middles 0.1, 1.75 and 1.0 m: levels 0.506, 1.556 and 0.506 m
    np.testing.assert_allclose(nearest[:3], raw[year, [0, 1, 0], 1, 1], atol=1e-5)
    np.testing.assert_allclose(mean[:3], [raw[year, 0, 1, 1], raw[year, 1, 1, 1], raw[year, :, 1, 1].mean()],
                               atol=1e-5)
    assert qc.tolist() == ["ok", "ok", "ok", "out_of_range"]  # 1990 is 3.5 years before the first step


def test_random_points_match_an_independent_numpy_search(tmp_path):
    """The acceptance check: a brute-force search over every cell reproduces the join."""
    path = grids.synthetic_grid(tmp_path / "g.zarr", resolution=3.0, months=24, lon_convention="-180..180",
                                descending_lat=True)
    ds = xr.open_zarr(path, decode_times=False, consolidated=False).load()
    thetao = ds["thetao"].values.astype(np.float64)
    lats, lons, depths = ds["lat"].values, ds["lon"].values, ds["depth"].values
    steps = np.datetime64("2019-01-01", "D") + ds["time"].values.astype("timedelta64[D]")
    rng = np.random.default_rng(11)
    n = 20_000
    lat, lon = rng.uniform(-89, 89, n), rng.uniform(-360, 720, n)
    depth = rng.uniform(0, 400, n)
    when = steps[0].astype("datetime64[ms]") + rng.integers(0, 720 * 86_400_000, n).astype("timedelta64[ms]")
    with Grid.open(path, "thetao") as grid:
        values, qc = grid.join(lat, lon, depth_min=depth, depth_max=depth, time=when)
    t = np.abs((when[:, None] - steps[None, :].astype("datetime64[ms]")).astype(np.int64)).argmin(1)
    z = brute_force_nearest(depths, depth)
    y, x = brute_force_nearest(lats, lat), brute_force_nearest(lons, lon, circular=True)
    expected = thetao[t, z, y, x]
    assert set(qc) == {"ok", "no_data"}
    np.testing.assert_array_equal(qc == "no_data", np.isnan(expected))
    np.testing.assert_array_equal(values[qc == "ok"], expected[qc == "ok"].astype(np.float32))
    # and the values are the analytic field at the chosen cell centres
    month = (steps[t].astype("datetime64[M]").astype(np.int64) % 12) + 1
    analytic = grids.synthetic_field("thetao", lats[y], lons[x], depths[z], month)
    np.testing.assert_allclose(values[qc == "ok"], analytic[qc == "ok"], atol=1e-4)


def test_random_points_on_a_real_0_360_grid_match_xarray_sel_away_from_the_seam(sample_data):
    path = sample_data / OSTIA_MONTHLY
    ds = xr.open_dataset(path)
    rng = np.random.default_rng(2)
    n = 5000
    lat, lon = rng.uniform(-4.9, 4.3, n), rng.uniform(1.0, 358.0, n)
    when = np.datetime64("2006-05-01", "ms") + rng.integers(0, 1500 * 86_400_000, n).astype("timedelta64[ms]")
    with Grid.open(path, "sst") as grid:
        values, qc = grid.join(lat, lon, time=when)
    reference = ds["surface_temperature"].sel(
        latitude=xr.DataArray(lat, dims="p"), longitude=xr.DataArray(lon, dims="p"),
        time=xr.DataArray(when.astype("datetime64[ns]"), dims="p"), method="nearest").values - 273.15
    np.testing.assert_array_equal(qc == "no_data", np.isnan(reference))  # land: Africa, America, Indonesia
    assert (qc == "ok").mean() > 0.6
    np.testing.assert_allclose(values, reference, atol=1e-4)  # NaN where NaN


def test_zarr_climatology_in_cftime_and_depth_limits(tmp_path):
    path = grids.synthetic_grid(tmp_path / "clim.zarr", resolution=5.0, climatology=True)
    with Grid.open(path, "thetao") as grid:
        assert grid.time_mode == "month" and grid.tolerances()["depth"] == 200.0
        values, qc = grid.join([2.6, 2.6, 2.6, 2.6, 2.6], [12.6, 12.6, 12.6, 12.6, 12.6],
                               depth_min=np.array([24.0, 24.0, 1000.0, np.nan, 90.0]),
                               depth_max=np.array([26.0, 26.0, 1000.0, np.nan, 110.0]),
                               time=np.array(["1950-07-30", "2031-02-01", "2020-01-01", "2020-01-01", "NaT"],
                                             dtype="datetime64[ms]"))
    expected = grids.synthetic_field("thetao", [2.5, 2.5], [15.0, 15.0], 25.0, [7, 2])  # cells 2.5 N, 15 E
    np.testing.assert_allclose(values[:2], expected, atol=1e-5)
    assert qc.tolist() == ["ok", "ok", "out_of_range", "no_position", "no_position"]
    with Grid.open(path, "sst") as grid:  # kelvin on disk, degC out; no depth axis: depth not needed
        values, qc = grid.join([2.6], [12.6], time=np.array(["2000-07-01"], dtype="datetime64[ms]"))
    np.testing.assert_allclose(values, grids.synthetic_field("sst", 2.5, 15.0, 0.0, 7), atol=1e-4)


def test_calendars_360_day_and_time_units():
    axis = TimeAxis.of(xr.DataArray([41415.0 * 86400], dims="t", name="t",
                                    attrs={"units": "seconds since 1900-01-01 00:00:00", "calendar": "360_day"}))
    days = axis.days_of(np.array(["2015-01-16T00:00", "2015-01-31T12:00", "NaT"], dtype="datetime64[ms]")
                        .astype(np.int64))
    # NEMO's time_centered: 2015-01-16 is day 41415 of a 360-day calendar; the 31st becomes the 30th
    np.testing.assert_allclose(days[:2], [41415.0, 41429.5])
    assert np.isnan(days[2])
    with pytest.raises(InputError, match="not '<unit> since <date>'"):
        TimeAxis.of(xr.DataArray([0.0], dims="t", name="t", attrs={"units": "months"}))


def test_axis_and_variable_names_and_errors(sample_data, tmp_path):
    with grids.opened(sample_data / OSTIA_MONTHLY) as ds:
        assert grids.resolve_variable(ds, "sst") == "surface_temperature"
        assert grids.detect_axes(ds["surface_temperature"]) == {"time": "time", "lat": "latitude",
                                                                "lon": "longitude"}
    with grids.opened(sample_data / SEAWIFS) as ds:
        assert grids.resolve_variable(ds, "chlor_a") == "chlor_a"
        grid = Grid(ds["chlor_a"], source=str(sample_data / SEAWIFS))
        chl = ds["chlor_a"]
        finite = np.argwhere(np.isfinite(chl.values))[:3]
        values, qc = grid.join(chl["lat"].values[finite[:, 0]], chl["lon"].values[finite[:, 1]])
        np.testing.assert_array_equal(values, chl.values[finite[:, 0], finite[:, 1]])
        assert grid.describe()["grid"].endswith(SEAWIFS)
    with grids.opened(sample_data / ATLANTIC) as ds:
        assert grids.resolve_variable(ds, "so") == "salinity"
    with pytest.raises(InputError, match="N_PROF"), Grid.open(sample_data / ARGO, "thetao"):
        pass
    with pytest.raises(InputError, match=r"no variable 'chlor_a'.*analysed_sst"), \
            Grid.open(sample_data / OSTIA_DAILY, "chlor_a"):
        pass
    with pytest.raises(InputError, match="depth must be"):
        JoinOptions(depth="deepest")
    assert grids.redact("s3://key:secret@bucket/g.zarr") == "s3://bucket/g.zarr"


def test_index_arithmetic_agrees_with_a_binary_search():
    rng = np.random.default_rng(8)
    for n, step, jitter in ((720, 0.5, 0.0), (4320, 1 / 12, 1e-6), (12, 30.4, 1.5)):  # 0.5 deg, float32-ish, months
        axis = np.sort(np.arange(n) * step + rng.uniform(-jitter, jitter, n))
        assert grids.regular_step(axis) is not None
        x = np.r_[rng.uniform(axis[0] - 3 * step, axis[-1] + 3 * step, 50_000), axis, (axis[:-1] + axis[1:]) / 2,
                  np.nan]
        fast, fast_dist = grids.nearest_sorted(axis, x, grids.regular_step(axis))
        slow, slow_dist = grids.nearest_sorted(axis, x)
        np.testing.assert_array_equal(fast[:-1], slow[:-1])  # ties at midpoints too
        np.testing.assert_array_equal(fast_dist, slow_dist)  # NaN: inf, never within a tolerance
    assert grids.regular_step(np.array([0.0, 1.0, 5.0, 6.0])) is None


def test_a_rewritten_grid_is_not_served_from_the_worker_cache(tmp_path):
    path = str(tmp_path / "g.nc")
    values = []
    for start, month in (("2019-01", 1), ("2019-07", 7)):  # one step each: valid at any time, same boxes
        grids.synthetic_grid(path, resolution=5.0, months=1, depths=(0.0,), start=start)
        for _ in range(2):  # the second lookup is served from the cache
            with Grid.open(path, "chlor_a") as grid:
                got, _ = grid.join([42.6], [12.6])
            values.append(got[0])
        np.testing.assert_allclose(values[-1], grids.synthetic_field("chlor_a", 42.5, 15.0, 0.0, month), atol=1e-6)
    assert values[0] == values[1] != values[2] == values[3]


def test_a_grid_file_is_opened_once_per_process_and_again_once_rewritten(tmp_path):
    path = str(tmp_path / "g.nc")
    point = {"lat": np.array([42.6]), "lon": np.array([12.6]), "depth_min": np.array([np.nan]),
             "depth_max": np.array([np.nan]), "time": np.array([grids_time("2019-03-10")])}
    grids._OPENED.clear()
    grids.synthetic_grid(path, resolution=5.0, months=1, depths=(0.0,), start="2019-01")
    before = grids._OPENED.opens
    for _ in range(3):  # shards of a stage on one worker: one open, one Grid per variable and options
        (value, qc), = grids.join_variables(path, {"chl": "chlor_a"}, point).values()
        assert qc[0] == "ok"
    assert grids._OPENED.opens == before + 1
    entry = grids._OPENED.entries[(path, "{}")]
    assert list(entry.grids) == [("chlor_a", JoinOptions())]
    # tasks in threads of one worker share the file
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: grids.join_variables(path, {"chl": "chlor_a"}, point, codes=True)["chl"],
                            range(8)))
    assert grids._OPENED.opens == before + 1 and all(g[1][0] == grids.QC_OK and g[0] == value for g in got)
    grids.synthetic_grid(path, resolution=5.0, months=1, depths=(0.0,), start="2019-07")  # rewritten in place
    (changed, _), = grids.join_variables(path, {"chl": "chlor_a"}, point).values()
    assert grids._OPENED.opens == before + 2 and entry.retired  # the old file's entry is closed
    np.testing.assert_allclose(changed, grids.synthetic_field("chlor_a", 42.5, 15.0, 0.0, 7), atol=1e-6)
    assert changed != value
    grids._OPENED.clear()
    assert not grids._OPENED.entries


def test_the_opened_grid_cache_keeps_a_bounded_number_of_files(tmp_path):
    cache = grids.join._OpenedGrids(2)
    paths = [str(grids.synthetic_grid(tmp_path / f"g{i}.nc", resolution=10.0, months=1, depths=(0.0,)))
             for i in range(3)]
    with cache.use(paths[0]) as first:
        for path in paths[1:]:
            with cache.use(path):
                pass
        assert len(cache.entries) == 2 and first.retired  # out of the cache, still open for its user
        assert float(first.ds["sst"].isel(time=0, lat=0, lon=0)) == float(first.ds["sst"][0, 0, 0])
    assert first.users == 0 and cache.opens == 3
    with cache.use(paths[2]), cache.use(paths[2]):  # still cached, used twice at once
        assert cache.opens == 3 and cache.entries[(paths[2], "{}")].users == 2
    cache.clear()
    assert not cache.entries


def grids_time(day: str) -> int:
    return int(np.datetime64(day, "ms").astype(np.int64))


# ---------------------------------------------------------------- files that are not grids


def test_a_file_that_is_not_a_grid_fails_with_one_short_line(sample_data, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("lat,lon\n1,2\n")
    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (tmp_path / "folder").mkdir()
    cases = [(text, "not a NetCDF or Zarr grid (netCDF4 cannot read it: NetCDF: Unknown file format)"),
             (png, "not a NetCDF or Zarr grid (netCDF4 cannot read it: NetCDF: Unknown file format)"),
             (tmp_path / "absent.nc", "no such file"),
             (tmp_path / "folder", "not a NetCDF or Zarr grid (a folder without zarr.json or .zgroup)")]
    for path, reason in cases:
        with pytest.raises(InputError) as caught:
            grids.open_grid(path)
        assert str(caught.value) == f"{path}: {reason}"  # the file, then what is wrong: no backend list
    with pytest.raises(InputError, match=r"SOURCE\.txt: not a NetCDF or Zarr grid"), \
            Grid.open(sample_data / "nctoolkit" / "SOURCE.txt", "sst"):
        pass


# ---------------------------------------------------------------- axes recognised the CF way


def level_grid(path, dim: str, levels, attrs: dict, *, lat_lon: tuple[str, str] = ("lat", "lon"),
               lat_attrs: dict | None = None, lon_attrs: dict | None = None) -> str:
    """A 3-level-or-more grid (dim, lat, lon) whose value is the level's index, so the level chosen shows."""
    lat, lon = np.arange(-60.0, 61.0, 30.0), np.arange(0.0, 360.0, 45.0)
    values = np.broadcast_to(np.arange(len(levels), dtype=np.float32)[:, None, None], (len(levels), 5, 8))
    ds = xr.Dataset({"thetao": ((dim, lat_lon[0], lat_lon[1]), values.copy(), {"units": "degC"})},
                    coords={dim: (dim, np.asarray(levels, np.float64), attrs),
                            lat_lon[0]: (lat_lon[0], lat, lat_attrs if lat_attrs is not None
                                         else {"units": "degrees_north"}),
                            lat_lon[1]: (lat_lon[1], lon, lon_attrs if lon_attrs is not None
                                         else {"units": "degrees_east"})})
    ds.to_netcdf(path)
    return str(path)


@pytest.mark.parametrize("levels, attrs", [
    ([0.0, 10.0, 50.0, 100.0], {"positive": "down", "units": "m"}),
    ([0.0, 10.0, 50.0, 100.0], {"positive": "down", "units": "meters"}),
    ([0.0, 0.01, 0.05, 0.1], {"positive": "down", "units": "km"}),
    ([0.0, 10.0, 50.0, 100.0], {"units": "dbar"}),  # pressure units alone say vertical (CF 4.3)
    ([0.0, 10.0, 50.0, 100.0], {"positive": "down", "units": "decibar"}),
    ([0.0, -10.0, -50.0, -100.0], {"positive": "up", "units": "m"}),  # heights: flipped to depths
    ([0.0, 10.0, 50.0, 100.0], {"axis": "Z", "units": "m"}),
])
def test_a_vertical_axis_under_an_unknown_name_is_found_by_its_cf_attributes(tmp_path, levels, attrs):
    path = level_grid(tmp_path / "g.nc", "zz", levels, attrs)
    with Grid.open(path, "thetao") as grid:
        assert grid.axes == {"depth": "zz", "lat": "lat", "lon": "lon"}
        np.testing.assert_allclose(grid.depth.values, [0.0, 10.0, 50.0, 100.0])
        depth = np.array([1.0, 12.0, 48.0, 90.0, 140.0, 400.0])
        values, qc = grid.join(np.zeros(6), np.full(6, 45.0), depth_min=depth, depth_max=depth)
    # nearest level of 0, 10, 50, 100 m within the largest spacing (50 m): 400 m is below the deepest
    np.testing.assert_array_equal(values[:5], [0, 1, 2, 3, 3])
    assert qc.tolist() == ["ok"] * 5 + ["out_of_range"]


def test_vertical_axes_that_are_not_depths_are_refused(tmp_path):
    path = level_grid(tmp_path / "a.nc", "zz", [0.0, 10.0, 50.0], {"units": "m"})  # no positive: not CF vertical
    with pytest.raises(InputError, match=r"dimension 'zz' \(3 steps\) is not lat, lon, depth or time"), \
            Grid.open(path, "thetao"):
        pass
    sigma = {"standard_name": "ocean_sigma_coordinate", "positive": "up", "formula_terms": "sigma: zz eta: e depth: d"}
    path = level_grid(tmp_path / "b.nc", "zz", [-0.9, -0.5, -0.1], sigma)
    with pytest.raises(InputError, match="'zz' .*is parametric"), Grid.open(path, "thetao"):
        pass
    path = level_grid(tmp_path / "c.nc", "zz", [1.0, 2.0, 3.0], {"positive": "down", "units": "level"})
    with pytest.raises(InputError, match="'zz' has units 'level', not a length or a pressure"), \
            Grid.open(path, "thetao"):
        pass


def test_axes_found_only_through_the_coordinates_attribute_the_axis_attribute_or_cf_xarray(tmp_path):
    lat, lon = np.array([-30.0, 0.0, 30.0]), np.array([10.0, 20.0, 30.0, 40.0])
    days = np.array([0.0, 31.0])
    values = (np.arange(2)[:, None, None] * 100 + np.arange(3)[None, :, None] * 10
              + np.arange(4)[None, None, :]).astype(np.float32)
    # dimensions without coordinates; the variable's CF coordinates attribute names 1-D auxiliaries
    ds = xr.Dataset({"thetao": (("t", "j", "i"), values),
                     "when": ("t", days, {"units": "days since 2020-01-01"}),
                     "row_lat": ("j", lat, {"units": "degrees_north"}),
                     "col_lon": ("i", lon, {"units": "degrees_east"})})
    ds["thetao"].attrs["coordinates"] = "when row_lat col_lon"
    ds.to_netcdf(tmp_path / "aux.nc")
    with netCDF4.Dataset(tmp_path / "aux.nc") as nc:
        assert nc["thetao"].coordinates == "when row_lat col_lon" and "j" not in nc.variables
    points = dict(lat=[29.0, -1.0], lon=[41.0, 19.0], time=np.array(["2020-02-02", "2020-01-01"], "M8[ms]"))
    with Grid.open(tmp_path / "aux.nc", "thetao") as grid:
        assert grid.axes == {"lat": "j", "lon": "i", "time": "t"}
        assert grid.coords == {"lat": "row_lat", "lon": "col_lon", "time": "when"}
        got, qc = grid.join(points["lat"], points["lon"], time=points["time"])
    np.testing.assert_array_equal(got, [123, 11])
    # the axis attribute alone (no units: degrees, as before); a THREDDS _CoordinateAxisType, read by cf_xarray
    for lat_attrs, lon_attrs in (({"axis": "Y"}, {"axis": "X"}),
                                 ({"_CoordinateAxisType": "Lat"}, {"_CoordinateAxisType": "Lon"})):
        path = level_grid(tmp_path / "axis.nc", "lvl", [0.0, 20.0, 40.0], {"axis": "Z", "units": "m"},
                          lat_lon=("row", "col"), lat_attrs=lat_attrs, lon_attrs=lon_attrs)
        with Grid.open(path, "thetao") as grid:
            assert grid.axes == {"depth": "lvl", "lat": "row", "lon": "col"}
            got, qc = grid.join([29.0], [44.0], depth_min=np.array([19.0]))
        assert got.tolist() == [1.0] and qc.tolist() == ["ok"]
    # a rotated-pole axis is not a latitude: without 2-D latitude/longitude the grid is refused
    path = level_grid(tmp_path / "rot.nc", "lvl", [0.0, 20.0, 40.0], {"axis": "Z", "units": "m"},
                      lat_lon=("rlat", "rlon"), lat_attrs={"standard_name": "grid_latitude", "units": "degrees"},
                      lon_attrs={"standard_name": "grid_longitude", "units": "degrees"})
    with pytest.raises(InputError, match="'rlat' is a rotated or projected axis"), Grid.open(path, "thetao"):
        pass


# ---------------------------------------------------------------- curvilinear grids


def haversine_nearest(cell_lat, cell_lon, lat, lon, chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Flat index of the nearest cell centre to each point, and the central angle to it, by the
    haversine formula over every cell (NaN centres skipped)."""
    keep = np.flatnonzero(np.isfinite(np.ravel(cell_lat)) & np.isfinite(np.ravel(cell_lon)))
    half_lat, half_lon = np.radians(np.ravel(cell_lat)[keep]) / 2, np.radians(np.ravel(cell_lon)[keep]) / 2
    sin_lat, cos_lat, sin_lon, cos_lon = np.sin(half_lat), np.cos(half_lat), np.sin(half_lon), np.cos(half_lon)
    cos_cell = np.cos(2 * half_lat)
    best, angle = np.zeros(len(lat), np.int64), np.zeros(len(lat))
    for a in range(0, len(lat), chunk):
        p = np.radians(np.asarray(lat[a:a + chunk], np.float64))[:, None] / 2
        q = np.radians(np.asarray(lon[a:a + chunk], np.float64))[:, None] / 2
        # sin((cell - point) / 2) expanded, so no trigonometry per pair
        dlat, dlon = sin_lat * np.cos(p) - cos_lat * np.sin(p), sin_lon * np.cos(q) - cos_lon * np.sin(q)
        h = dlat ** 2 + np.cos(2 * p) * cos_cell * dlon ** 2  # increases with the distance
        k = h.argmin(1)
        best[a:a + chunk] = keep[k]
        angle[a:a + chunk] = 2 * np.arcsin(np.sqrt(np.clip(h[np.arange(len(k)), k], 0, 1)))
    return best, angle


def angle_to(cell_lat, cell_lon, flat, lat, lon) -> np.ndarray:
    cl, cn = np.radians(np.ravel(cell_lat)[flat]), np.radians(np.ravel(cell_lon)[flat])
    p, q = np.radians(lat), np.radians(lon)
    return 2 * np.arcsin(np.sqrt(np.sin((cl - p) / 2) ** 2 + np.cos(p) * np.cos(cl) * np.sin((cn - q) / 2) ** 2))


def assert_nearest_or_tie(got, expected, angle_min, cell_lat, cell_lon, lat, lon):
    """The same cells, except where two centres are equally near (within 1e-9 rad, ~6 mm)."""
    differ = got != expected
    tie = np.abs(angle_to(cell_lat, cell_lon, got[differ], lat[differ], lon[differ]) - angle_min[differ]) < 1e-9
    assert tie.all(), (lat[differ][~tie], lon[differ][~tie])
    assert differ.mean() < 0.01


def rotated(rlat, rlon, tilt: float, turn: float) -> tuple[np.ndarray, np.ndarray]:
    """True latitude/longitude of rotated-grid coordinates: the sphere turned by ``tilt`` degrees
    about the y axis, then ``turn`` degrees about the polar axis."""
    rlat, rlon = np.broadcast_arrays(np.asarray(rlat, np.float64), np.asarray(rlon, np.float64))
    p, q = np.radians(rlat), np.radians(rlon)
    x, y, z = np.cos(p) * np.cos(q), np.cos(p) * np.sin(q), np.sin(p)
    t, u = np.radians(tilt), np.radians(turn)
    x, z = x * np.cos(t) + z * np.sin(t), -x * np.sin(t) + z * np.cos(t)
    x, y = x * np.cos(u) - y * np.sin(u), x * np.sin(u) + y * np.cos(u)
    return np.degrees(np.arcsin(np.clip(z, -1, 1))), np.degrees(np.arctan2(y, x))


def curvilinear_file(path, lat2d, lon2d, values, *, name: str = "thetao", dims=("y", "x"), extra=None,
                     indices: bool = False) -> str:
    """A CF curvilinear grid: 2-D latitude/longitude named by the variable's coordinates attribute
    (xarray writes it for non-index coordinates); the dimensions without coordinates, or with cell
    numbers as coordinates (``indices``: named y and x, as the name table's latitude and longitude)."""
    extra = dict(extra or {})
    lead = tuple(extra)
    if indices:
        extra.update({d: (np.arange(n), {}) for d, n in zip(dims, lat2d.shape, strict=True)})
    ds = xr.Dataset({name: ((*lead, *dims), values, {"units": "degC"})},
                    coords={"lat2d": (dims, lat2d, {"standard_name": "latitude", "units": "degrees_north"}),
                            "lon2d": (dims, lon2d, {"standard_name": "longitude", "units": "degrees_east"}),
                            **{k: (k, v[0], v[1]) for k, v in extra.items()}})
    ds.to_netcdf(path)
    return str(path)


def sphere_points(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform on the sphere, plus crowds near the antimeridian and both poles."""
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    lon = rng.uniform(-180, 180, n)
    seam_lat, seam_lon = rng.uniform(-80, 80, n // 4), rng.uniform(179.0, 181.0, n // 4)  # 181 = -179
    pole_lat = np.r_[rng.uniform(88.0, 90.0, n // 8), rng.uniform(-90.0, -88.0, n // 8)]
    pole_lon = rng.uniform(-360, 360, len(pole_lat))
    return np.r_[lat, seam_lat, pole_lat], np.r_[lon, seam_lon, pole_lon]


def test_rotated_global_grid_nearest_cells_match_a_haversine_search(tmp_path):
    rlat, rlon = np.arange(-89.0, 90.0, 2.0), np.arange(-180.0, 180.0, 2.0)
    lat2d, lon2d = rotated(rlat[:, None], rlon[None, :], tilt=50.0, turn=-170.0)  # poles inside the grid
    field = grids.synthetic_field("thetao", lat2d, lon2d).astype(np.float32)
    path = curvilinear_file(tmp_path / "rot.nc", lat2d, lon2d, field)
    rng = np.random.default_rng(21)
    lat, lon = sphere_points(rng, 3000)
    expected, angle_min = haversine_nearest(lat2d, lon2d, lat, lon)
    tree = grids.CellTree.of(lat2d, lon2d)
    flat, chord, reach = tree.nearest(lat, lon)
    assert_nearest_or_tie(flat, expected, angle_min, lat2d, lon2d, lat, lon)
    np.testing.assert_allclose(grids.km_of_chord(chord) / grids.EARTH_RADIUS_KM, angle_min, atol=1e-9)
    with Grid.open(path, "thetao") as grid:
        assert grid.curvilinear and grid.axes == {"y": "y", "x": "x"} and grid.lat is None
        values, qc = grid.join(lat, lon)
    assert set(qc) == {"ok"}  # a global grid: every point on it
    same = flat == expected
    np.testing.assert_array_equal(values[same], field.ravel()[expected[same]])
    np.testing.assert_allclose(values, grids.synthetic_field("thetao", lat2d.ravel()[flat], lon2d.ravel()[flat]),
                               atol=1e-4)


def test_a_regional_grid_across_the_antimeridian_flags_points_off_its_footprint(tmp_path):
    rlat, rlon = np.arange(-10.0, 10.01, 0.5), np.arange(-15.0, 15.01, 0.5)  # 41 x 61 cells of 0.5 degrees
    tilt, turn = -70.0, 180.0  # its centre at 70 N on the antimeridian
    lat2d, lon2d = rotated(rlat[:, None], rlon[None, :], tilt, turn)
    assert (lon2d > 170).any() and (lon2d < -170).any()
    field = (lat2d * 1000 + np.mod(lon2d, 360)).astype(np.float32)
    path = curvilinear_file(tmp_path / "arctic.nc", lat2d, lon2d, field, indices=True)
    rng = np.random.default_rng(4)
    inside = rng.uniform(-10.0, 10.0, 800), rng.uniform(-15.0, 15.0, 800)
    off_lat, off_lon = rng.uniform(11.0, 40.0, 400) * rng.choice([-1, 1], 400), rng.uniform(-40.0, 40.0, 400)
    beyond_lon = rng.uniform(-10.0, 10.0, 400), rng.uniform(16.0, 60.0, 400) * rng.choice([-1, 1], 400)
    near_edge = np.r_[rng.uniform(-10.0, 10.0, 100), np.full(100, 10.25)], np.r_[np.full(100, -15.25),
                                                                                  rng.uniform(-15.0, 15.0, 100)]
    r_lat = np.r_[inside[0], off_lat, beyond_lon[0], near_edge[0]]
    r_lon = np.r_[inside[1], off_lon, beyond_lon[1], near_edge[1]]
    lat, lon = rotated(r_lat, r_lon, tilt, turn)
    with Grid.open(path, "thetao") as grid:
        assert grid.curvilinear and grid.coords == {"lat": "lat2d", "lon": "lon2d"}  # not the y, x cell numbers
        values, qc = grid.join(lat, lon)
        rows, cols, _ = grid._nearest_cells(lat, lon)
    on = np.r_[np.ones(800, bool), np.zeros(800, bool), np.ones(200, bool)]  # up to a quarter cell past the edge
    assert qc[on].tolist() == ["ok"] * on.sum() and set(qc[~on]) == {"out_of_range"}
    assert np.isnan(values[~on]).all()
    expected, angle_min = haversine_nearest(lat2d, lon2d, lat[on], lon[on])
    assert_nearest_or_tie(rows[on] * lat2d.shape[1] + cols[on], expected, angle_min, lat2d, lon2d, lat[on], lon[on])
    np.testing.assert_array_equal(values[on], field.ravel()[rows[on] * lat2d.shape[1] + cols[on]])
    # a tolerance given replaces the footprint: within 30 degrees of longitude of the nearest centre
    with Grid.open(path, "thetao", options=JoinOptions(lon_tolerance=30.0)) as grid:
        assert grid.tolerances() == {"lon": 30.0}
        _, qc_wide = grid.join(lat, lon)
    assert (qc_wide[~on] == "ok").any()


def test_cells_without_a_position_are_never_nearest(tmp_path):
    rlat, rlon = np.arange(-10.0, 10.01, 1.0), np.arange(-10.0, 10.01, 1.0)
    lat2d, lon2d = rotated(rlat[:, None], rlon[None, :], tilt=-40.0, turn=30.0)  # around 40 N 30 E
    lat2d[3, 4:9] = lon2d[3, 4:9] = 0.0  # a masked halo written as zeros (some NEMO outputs)
    lat2d[10, 2:6] = lon2d[10, 2:6] = np.nan  # masked coordinates
    field = np.arange(lat2d.size, dtype=np.float32).reshape(lat2d.shape)
    path = curvilinear_file(tmp_path / "masked.nc", lat2d, lon2d, field)
    placed = np.isfinite(lat2d) & ~((lat2d == 0) & (lon2d == 0))
    rng = np.random.default_rng(6)
    lat, lon = rotated(rng.uniform(-9.5, 9.5, 500), rng.uniform(-9.5, 9.5, 500), tilt=-40.0, turn=30.0)
    with Grid.open(path, "thetao") as grid:
        values, qc = grid.join(np.r_[lat, 0.1, 0.0], np.r_[lon, 0.1, 0.0])
    expected, _ = haversine_nearest(np.where(placed, lat2d, np.nan), lon2d, lat, lon)
    np.testing.assert_array_equal(values[:-2], field.ravel()[expected])
    assert qc[-2:].tolist() == ["out_of_range", "out_of_range"]  # (0, 0) is far off this grid
    # land beside the masked cells: filled from the nearest cell with a position and a value
    field[8:12, 1:7] = np.nan
    path = curvilinear_file(tmp_path / "land.nc", lat2d, lon2d, field)
    land_lat, land_lon = lat2d[8:12, 1:7][placed[8:12, 1:7]], lon2d[8:12, 1:7][placed[8:12, 1:7]]
    with Grid.open(path, "thetao", options=JoinOptions(land_fill_km=150)) as grid:
        values, qc = grid.join(land_lat + 0.1, land_lon - 0.1)
    ocean = placed & np.isfinite(field)
    expected, angle = haversine_nearest(np.where(ocean, lat2d, np.nan), lon2d, land_lat + 0.1, land_lon - 0.1)
    close = angle * grids.EARTH_RADIUS_KM <= 150
    assert 0 < close.sum() < len(close)
    assert qc.tolist() == np.where(close, "land_filled", "no_data").tolist()
    np.testing.assert_array_equal(values[close], field.ravel()[expected[close]])


def regular_and_curvilinear(tmp_path) -> tuple[str, str]:
    """The synthetic regular grid (3 degrees, 3 months, 3 levels) and the same values written as a
    curvilinear grid: latitude and longitude broadcast to 2-D."""
    regular = grids.synthetic_grid(tmp_path / "regular.nc", resolution=3.0, months=3, depths=(0.0, 25.0, 100.0))
    ds = xr.open_dataset(regular, decode_times=False)
    lat2d, lon2d = np.meshgrid(ds["lat"].values, ds["lon"].values, indexing="ij")
    extra = {"time": (ds["time"].values, ds["time"].attrs), "depth": (ds["depth"].values, ds["depth"].attrs)}
    curvilinear = curvilinear_file(tmp_path / "curvilinear.nc", lat2d, lon2d, ds["thetao"].values, extra=extra)
    ds.close()
    return regular, curvilinear


def test_a_regular_grid_written_curvilinear_joins_as_the_regular_join_does(tmp_path):
    regular, curvilinear = regular_and_curvilinear(tmp_path)
    ds = xr.open_dataset(regular, decode_times=False)
    lats, lons = ds["lat"].values, ds["lon"].values
    ds.close()
    rng = np.random.default_rng(17)
    n = 4000
    lat, lon = rng.uniform(-89.9, 89.9, n), rng.uniform(-180.0, 540.0, n)
    depth = rng.uniform(0.0, 150.0, n)
    when = np.datetime64("2019-01-01", "ms") + rng.integers(0, 80 * 86_400_000, n).astype("timedelta64[ms]")
    for options in (JoinOptions(), JoinOptions(depth="mean", land_fill_km=400)):
        kwargs = dict(depth_min=depth, depth_max=depth + 30.0, time=when)
        with Grid.open(regular, "thetao", options=options) as grid:
            expected, expected_qc = grid.join(lat, lon, **kwargs)
        with Grid.open(curvilinear, "thetao", options=options) as grid:
            assert grid.curvilinear and grid.describe()["tolerances"]["cell_diagonals"] == 1.0
            values, qc = grid.join(lat, lon, **kwargs)
        # nearest on the sphere and nearest latitude then longitude differ only near the middle between
        # two rows (great circles bow poleward): there the sphere's choice is checked against haversine
        lat2d, lon2d = np.meshgrid(lats, lons, indexing="ij")
        spherical, _ = haversine_nearest(lat2d, lon2d, lat, lon)
        separable = brute_force_nearest(lats, lat) * len(lons) + brute_force_nearest(lons, lon, circular=True)
        same = spherical == separable
        assert 0 < (~same).sum() < 0.01 * n
        np.testing.assert_array_equal(values[same], expected[same])
        np.testing.assert_array_equal(qc[same], expected_qc[same])
        assert {"ok", "no_data"} <= set(qc) and (options.land_fill_km is None or "land_filled" in set(qc))
    # points all on the synthetic land: the cells read for them are land, the fill reads a wider box
    coast_lat, coast_lon = rng.uniform(37.0, 58.0, 300), rng.uniform(-98.0, -77.0, 300)
    results = []
    for path in (regular, curvilinear):
        with Grid.open(path, "thetao", options=JoinOptions(land_fill_km=500)) as grid:
            results.append(grid.join(coast_lat, coast_lon, depth_min=np.full(300, 10.0), time=when[:300]))
    (expected, expected_qc), (values, qc) = results
    assert {"land_filled", "no_data"} <= set(qc)
    np.testing.assert_array_equal(qc, expected_qc)
    np.testing.assert_array_equal(values, expected)


def test_nemo_sample_joins_at_the_nearest_cell_of_its_nav_lat_nav_lon(sample_data):
    path = sample_data / NEMO
    tos = read_raw(path, "tos")[0]
    nav_lat, nav_lon = read_raw(path, "nav_lat"), read_raw(path, "nav_lon")
    rng = np.random.default_rng(9)
    n = 800
    lat, lon = np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-78.0)), 1.0, n))), rng.uniform(-180, 360, n)
    with Grid.open(path, "sst") as grid:  # 'sst' finds tos by its standard name
        assert grid.name == "tos" and grid.curvilinear and grid.time_mode == "none"
        assert grid.coords == {"lat": "nav_lat", "lon": "nav_lon", "time": "time_centered"}
        values, qc = grid.join(lat, lon, time=np.full(n, np.datetime64("2015-01-20", "ms")))
        rows, cols, _ = grid._nearest_cells(lat, lon)
        tree = grid.cell_tree()
    with Grid.open(path, "sst") as again:
        assert again.cell_tree() is tree  # built once per file and process
    expected, angle_min = haversine_nearest(nav_lat, nav_lon, lat, lon)
    got = rows * nav_lat.shape[1] + cols
    assert_nearest_or_tie(got, expected, angle_min, nav_lat, nav_lon, lat, lon)
    truth = tos.ravel()[got]
    assert set(qc) == {"ok", "no_data"}  # south of 78 S only land and ice shelves; the model covers the rest
    np.testing.assert_array_equal(qc == "no_data", np.isnan(truth))
    np.testing.assert_array_equal(values[qc == "ok"], truth[qc == "ok"].astype(np.float32))
    assert (qc == "ok").mean() > 0.5
    # land points take the nearest ocean cell within the radius, found over every cell by haversine
    land = np.flatnonzero(qc == "no_data")[:60]
    with Grid.open(path, "sst", options=JoinOptions(land_fill_km=300)) as grid:
        filled, filled_qc = grid.join(lat[land], lon[land])
    ocean = np.isfinite(tos)
    nearest_ocean, ocean_angle = haversine_nearest(np.where(ocean, nav_lat, np.nan), np.where(ocean, nav_lon, np.nan),
                                                   lat[land], lon[land])
    close = ocean_angle * grids.EARTH_RADIUS_KM <= 300
    assert 0 < close.sum() < len(land)
    assert filled_qc.tolist() == np.where(close, "land_filled", "no_data").tolist()
    np.testing.assert_array_equal(filled[close], tos.ravel()[nearest_ocean[close]].astype(np.float32))
