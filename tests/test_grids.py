"""Nearest-cell lookups on the real grids in tests/data and on synthetic grids, checked
against the values in the grid notes and against an independent brute-force numpy search."""

from __future__ import annotations

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
    with pytest.raises(InputError, match="curvilinear"), Grid.open(sample_data / NEMO, "sst"):
        pass
    with pytest.raises(InputError, match="N_PROF"), Grid.open(sample_data / ARGO, "thetao"):
        pass
    with pytest.raises(InputError, match=r"no variable 'chlor_a'.*analysed_sst"), \
            Grid.open(sample_data / OSTIA_DAILY, "chlor_a"):
        pass
    with pytest.raises(InputError, match="cannot open as a grid"):
        grids.open_grid(sample_data / "nctoolkit" / "SOURCE.txt")
    with pytest.raises(InputError, match="cannot open as a grid"):
        grids.open_grid(tmp_path / "absent.nc")
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
