"""A small synthetic global grid with known values (``synthetic_field``), for demos and tests."""

from __future__ import annotations

import tempfile
from typing import Any

import cftime
import fsspec
import numpy as np
import xarray as xr

from pzscale.errors import InputError

SYNTHETIC_LAND = (35.0, 60.0, -100.0, -75.0)  # lat0, lat1, lon0, lon1 (-180..180): NaN at every depth


def synthetic_field(name: str, lat: Any, lon: Any, depth: Any = 0.0, month: Any = 1) -> np.ndarray:
    """The analytic values ``synthetic_grid`` stores at cell centres (land not applied), in the
    units the joined values come out in (thetao/sst degC, so 1e-3, chlor_a mg m-3)."""
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    depth, month = np.asarray(depth, np.float64), np.asarray(month, np.float64)
    season = np.cos(2 * np.pi * (month - 1) / 12) * np.sign(lat)
    if name in ("thetao", "sst"):
        surface = 28.0 - 26.0 * (lat / 90.0) ** 2 + 2.0 * season + 0.5 * np.sin(np.radians(lon))
        return 2.0 + (surface - 2.0) * np.exp(-depth / 400.0)
    if name == "so":
        return 35.0 + 0.8 * np.cos(np.radians(lat)) - 0.3 * np.sin(np.radians(2 * lon)) + depth / 1000.0
    if name == "chlor_a":
        return 0.1 + 0.02 * np.abs(lat) + 0.05 * (1 + season) + 0.01 * np.cos(np.radians(lon))
    raise InputError(f"synthetic grids have thetao, sst, so and chlor_a, not {name!r}")


def synthetic_grid(
    path: str,
    *,
    resolution: float = 2.0,
    lon_convention: str = "0..360",
    depths: tuple[float, ...] = (0.0, 25.0, 100.0, 300.0),
    start: str = "2019-01",
    months: int = 48,
    climatology: bool = False,
    descending_lat: bool = False,
    storage_options: dict | None = None,
) -> str:
    """Write a small global grid with known values (``synthetic_field``) for demos and tests.

    Variables: ``thetao`` and ``so`` (time, depth, lat, lon), ``sst`` (time, lat, lon; in kelvin,
    so a join converts it back) and ``chlor_a`` (time, lat, lon); NaN over ``SYNTHETIC_LAND``.
    Monthly steps at mid-month from ``start`` (``months`` of them), or with ``climatology`` 12
    steps in year 0001 (cftime, CF ``climatology`` attribute, as NOAA's long-term means).
    NetCDF unless ``path`` ends with ``.zarr``; ``lon_convention`` is "0..360" or "-180..180".
    """
    half = resolution / 2
    lat = np.arange(-90 + half, 90, resolution)
    if descending_lat:
        lat = lat[::-1]
    if lon_convention == "0..360":
        lon = np.arange(0.0, 360.0, resolution)
    elif lon_convention == "-180..180":
        lon = np.arange(-180.0, 180.0, resolution)
    else:
        raise InputError(f"lon_convention must be '0..360' or '-180..180', not {lon_convention!r}")
    if climatology:
        dates = [cftime.DatetimeGregorian(1, m, 15) for m in range(1, 13)]
        time_units = "days since 0001-01-01 00:00:00"
        month_of_step = np.arange(1, 13)
    else:
        first = np.datetime64(start, "M")
        steps = first + np.arange(months)
        dates = [cftime.DatetimeGregorian(int(str(s)[:4]), int(str(s)[5:7]), 15) for s in steps]
        time_units = f"days since {str(first)}-01 00:00:00"
        month_of_step = steps.astype(np.int64) % 12 + 1
    raw_time = np.asarray(cftime.date2num(dates, time_units, calendar="standard"), dtype=np.float64)
    depth = np.asarray(depths, np.float64)
    la, lo = lat[:, None], lon[None, :]
    lon180 = ((lo + 180) % 360) - 180
    land = (la >= SYNTHETIC_LAND[0]) & (la <= SYNTHETIC_LAND[1]) & (lon180 >= SYNTHETIC_LAND[2]) & \
        (lon180 <= SYNTHETIC_LAND[3])

    def field(name: str, four_d: bool) -> np.ndarray:
        if four_d:
            values = synthetic_field(name, la, lo, depth[None, :, None, None], month_of_step[:, None, None, None])
            shape = (len(month_of_step), len(depth), len(lat), len(lon))
        else:
            values = synthetic_field(name, la, lo, 0.0, month_of_step[:, None, None])
            shape = (len(month_of_step), len(lat), len(lon))
        return np.broadcast_to(np.where(land, np.nan, values), shape).astype(np.float32)

    time_attrs = {"units": time_units, "calendar": "standard", "axis": "T", "standard_name": "time"}
    if climatology:
        time_attrs["climatology"] = "climatology_bounds"
    ds = xr.Dataset(
        {
            "thetao": (("time", "depth", "lat", "lon"), field("thetao", True),
                       {"units": "degC", "standard_name": "sea_water_potential_temperature"}),
            "so": (("time", "depth", "lat", "lon"), field("so", True),
                   {"units": "1e-3", "standard_name": "sea_water_salinity"}),
            "sst": (("time", "lat", "lon"), (field("sst", False) + np.float32(273.15)).astype(np.float32),
                    {"units": "K", "standard_name": "sea_surface_temperature"}),
            "chlor_a": (("time", "lat", "lon"), field("chlor_a", False),
                        {"units": "mg m-3",
                         "standard_name": "mass_concentration_of_chlorophyll_a_in_sea_water"}),
        },
        coords={
            "time": ("time", raw_time, time_attrs),
            "depth": ("depth", depth, {"units": "m", "positive": "down", "axis": "Z", "standard_name": "depth"}),
            "lat": ("lat", lat, {"units": "degrees_north", "standard_name": "latitude"}),
            "lon": ("lon", lon, {"units": "degrees_east", "standard_name": "longitude"}),
        },
        attrs={"title": "pzscale synthetic ocean grid", "Conventions": "CF-1.8",
               "comment": "values from pzscale.grids.synthetic_field at cell centres; NaN over SYNTHETIC_LAND"},
    )
    path = str(path)
    if path.rstrip("/").endswith(".zarr"):
        ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False, storage_options=storage_options)
    else:
        # one chunk per time step and level, as products are laid out for reading maps
        encoding = {v: {"zlib": True, "complevel": 1, "chunksizes": (1,) * (ds[v].ndim - 2) + (len(lat), len(lon))}
                    for v in ds.data_vars}
        if fsspec.utils.get_protocol(path) in ("file", "local"):
            ds.to_netcdf(path, encoding=encoding)
        else:  # netCDF4 writes local files only: write one, then upload it
            with tempfile.TemporaryDirectory() as tmp:
                ds.to_netcdf(f"{tmp}/grid.nc", encoding=encoding)
                fs, remote = fsspec.core.url_to_fs(path, **(storage_options or {}))
                fs.put_file(f"{tmp}/grid.nc", remote)
    return path
