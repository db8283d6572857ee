"""CF naming and opening of ocean grids: open NetCDF or Zarr, find the variable, detect its axes.

- ``open_grid`` opens NetCDF (netCDF-4 or classic) or Zarr, local or on object storage, lazily:
  CF masking and scaling are applied, times are left as numbers and decoded later
  (``pzscale.grids.axes.TimeAxis``) so that cftime calendars (a climatology's year 0001,
  ``360_day``) never reach pandas.
- ``VARIABLE_MAP`` maps the names users join (``sst``, ``thetao``, ``so``, ``chlor_a`` ...) to the
  variable names and CF standard names products use; ``detect_axes`` finds lat/latitude/Y,
  lon/longitude/X, depth/lev/Z and time by attributes first, then by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import fsspec
import xarray as xr

from pzscale.errors import InputError, one_line

# env name -> grid variable names and CF standard names, tried in order
VARIABLE_MAP: dict[str, tuple[str, ...]] = {
    "sst": ("sst", "analysed_sst", "surface_temperature", "tos", "SST", "sea_surface_temperature",
            "sea_surface_foundation_temperature", "sea_surface_skin_temperature"),
    "thetao": ("thetao", "theta", "votemper", "temp", "temperature", "TEMP", "sea_water_potential_temperature",
               "sea_water_temperature", "sea_water_conservative_temperature"),
    "so": ("so", "salinity", "vosaline", "salt", "PSAL", "sea_water_salinity", "sea_water_practical_salinity",
           "sea_water_absolute_salinity"),
    "sss": ("sss", "sos", "SSS", "sea_surface_salinity"),
    "chlor_a": ("chlor_a", "chl", "CHL", "chla", "CHLA", "chlorophyll",
                "mass_concentration_of_chlorophyll_a_in_sea_water",
                "mass_concentration_chlorophyll_concentration_in_sea_water",
                "mass_concentration_of_chlorophyll_in_sea_water"),
    "o2": ("o2", "DOXY", "oxygen", "mole_concentration_of_dissolved_molecular_oxygen_in_sea_water"),
    "no3": ("no3", "NITRATE", "nitrate", "mole_concentration_of_nitrate_in_sea_water"),
    "mld": ("mld", "mlotst", "ocean_mixed_layer_thickness_defined_by_sigma_theta"),
}

# axis -> (CF standard names, units, ``axis`` attribute, names compared without case)
_AXES: dict[str, tuple[tuple[str, ...], tuple[str, ...], str, tuple[str, ...]]] = {
    "lat": (("latitude", "grid_latitude"), ("degrees_north", "degree_north", "degree_n", "degrees_n", "degreen",
                                            "degreesn"), "Y",
            ("lat", "latitude", "y", "nav_lat", "lats", "yt_ocean", "lat_rho")),
    "lon": (("longitude", "grid_longitude"), ("degrees_east", "degree_east", "degree_e", "degrees_e", "degreee",
                                              "degreese"), "X",
            ("lon", "longitude", "x", "nav_lon", "long", "lons", "xt_ocean", "lon_rho")),
    "depth": (("depth", "height", "altitude", "sea_water_pressure"), (), "Z",
              ("depth", "lev", "level", "z", "zlev", "deptht", "depthu", "depthv", "depthw", "st_ocean", "pres")),
    "time": (("time",), (), "T", ("time", "t", "time_counter", "juld", "date")),
}
AXIS_ORDER = ("time", "depth", "lat", "lon")
KELVIN_UNITS = {"k", "kelvin", "degk", "deg_k", "degrees_k", "degree_k", "degreek"}


# ---------------------------------------------------------------- opening


def redact(url: str) -> str:
    """The URL without user:password@ (grid paths are recorded in catalog attributes)."""
    return re.sub(r"(?<=://)[^/@]*@", "", str(url))


def _is_zarr(path: str, storage_options: dict | None) -> bool:
    if path.rstrip("/").endswith(".zarr"):
        return True
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return fs.isdir(root) and (fs.exists(f"{root}/zarr.json") or fs.exists(f"{root}/.zgroup"))


def open_grid(path: str, *, storage_options: dict | None = None) -> xr.Dataset:
    """Open a gridded product lazily (nothing but coordinates is read until a lookup asks).

    Zarr (local or any fsspec URL, e.g. ``s3://``) is read in place; a remote NetCDF file is
    first copied to this process's cache (``simplecache::``), since netCDF4 needs a local file.
    Times stay numbers (``decode_times=False``): ``time_axis`` decodes them with cftime.
    """
    path = str(path)
    so = storage_options or {}
    try:
        if _is_zarr(path, so):
            kwargs = dict(chunks=None, decode_times=False, decode_timedelta=False, storage_options=so or None)
            try:
                return xr.open_zarr(path, consolidated=True, **kwargs)
            except (KeyError, ValueError, FileNotFoundError):  # no consolidated metadata: list the store
                return xr.open_zarr(path, consolidated=False, **kwargs)
        protocol = fsspec.utils.get_protocol(path)
        local = path
        if protocol not in ("file", "local"):
            local = fsspec.open_local(f"simplecache::{path}", **({protocol: so} if so else {}))
        return xr.open_dataset(local, decode_times=False, decode_timedelta=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{redact(path)}: cannot open as a grid (NetCDF or Zarr): {one_line(e)}") from None


@contextmanager
def opened(path: str, *, storage_options: dict | None = None) -> Iterator[xr.Dataset]:
    ds = open_grid(path, storage_options=storage_options)
    try:
        yield ds
    finally:
        ds.close()


def resolve_variable(ds: xr.Dataset, name: str, *, where: str = "grid") -> str:
    """The data variable for ``name``: itself if present, else the first of ``VARIABLE_MAP[name]``
    found as a variable name or a CF standard_name."""
    if name in ds.data_vars:
        return name
    for candidate in VARIABLE_MAP.get(name, ()):
        if candidate in ds.data_vars:
            return candidate
    for candidate in VARIABLE_MAP.get(name, ()):
        for var, da in ds.data_vars.items():
            if da.attrs.get("standard_name") == candidate:
                return str(var)
    raise InputError(f"{where}: no variable {name!r} (known aliases: {list(VARIABLE_MAP.get(name, ()))}); "
                     f"variables here: {sorted(map(str, ds.data_vars))}")


def _axis_of(name: str, coord: xr.DataArray | None) -> str | None:
    attrs = coord.attrs if coord is not None else {}
    standard = str(attrs.get("standard_name", "")).lower()
    units = str(attrs.get("units", "")).lower().replace(" ", "_")
    axis_attr = str(attrs.get("axis", "")).upper()
    for axis, (standard_names, unit_names, axis_letter, _) in _AXES.items():
        if standard in standard_names or (unit_names and units in unit_names):
            return axis
        if axis_attr == axis_letter:
            return axis
    if " since " in units:
        return "time"
    lowered = name.lower()
    for axis, (*_, names) in _AXES.items():
        if lowered in names:
            return axis
    return None


def detect_axes(da: xr.DataArray, *, where: str = "grid") -> dict[str, str]:
    """{axis: dimension} for the variable's dimensions (axes among lat, lon, depth, time).

    Raises InputError for a curvilinear grid (2-D latitude/longitude) or a dimension of more
    than one step that is none of the four axes.
    """
    found: dict[str, str] = {}
    coords = dict(da.coords.items())  # not da.coords.get: it invents a range for a dimension without one
    for dim in map(str, da.dims):
        coord = coords.get(dim)
        axis = _axis_of(dim, coord)
        if coord is None and axis in ("lat", "lon"):
            two_d = [str(c) for c in da.coords if da.coords[c].ndim == 2]
            raise InputError(f"{where}: dimension {dim!r} has no 1-D coordinate ({', '.join(two_d) or 'none'} "
                             "are 2-D): curvilinear grids are not supported; regrid to a regular lat/lon grid")
        if axis is None or axis in found:
            if da.sizes[dim] == 1:
                continue
            raise InputError(f"{where}: dimension {dim!r} ({da.sizes[dim]} steps) is not lat, lon, depth or time")
        found[axis] = dim
    for axis in ("lat", "lon"):
        if axis not in found:
            raise InputError(f"{where}: no {axis} dimension among {list(map(str, da.dims))}")
    return found
