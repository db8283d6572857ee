"""CF naming and opening of ocean grids: open NetCDF or Zarr, find the variable, recognise its axes.

- ``open_grid`` opens NetCDF (netCDF-4 or classic) or Zarr, local or on object storage, lazily:
  CF masking and scaling are applied, times are left as numbers and decoded later
  (``pzscale.grids.axes.TimeAxis``) so that cftime calendars (a climatology's year 0001,
  ``360_day``) never reach pandas. A file that is neither fails with one short line.
- ``VARIABLE_MAP`` maps the names users join (``sst``, ``thetao``, ``so``, ``chlor_a`` ...) to the
  variable names and CF standard names products use.
- ``find_axes`` (``detect_axes`` for its dimensions) recognises latitude, longitude, the vertical
  and time among the variable's coordinates: its index coordinates and the auxiliary ones its
  ``coordinates`` attribute names (xarray attaches those). Each coordinate is identified, first
  match wins, by (1) the attributes CF defines for it, read here: ``standard_name``, units
  (degrees_north/east, ``<unit> since <date>``, pressure), ``positive`` (up/down: vertical),
  ``axis``; (2) cf_xarray's criteria (``da.cf.coordinates``/``da.cf.axes``: ``_CoordinateAxisType``,
  ``cartesian_axis``, ``grads_dim``, ``long_name``, parametric vertical standard names); (3) a table
  of names products use (``lat``, ``nav_lon``, ``deptht``, ``time_counter`` ...). cf_xarray's
  name guessing (``guess_coord_axis``, whose patterns call any name starting with x or i an X
  axis) is not used: the name table is exact. Latitude and longitude 1-D on two dimensions make a
  regular grid; 2-D on the same two (NEMO's ``nav_lat nav_lon``, ROMS, HYCOM) a curvilinear one.
- ``vertical_metres`` gives the factor from a vertical coordinate's units to metres of depth.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import cf_xarray  # noqa: F401  (registers the .cf accessor)
import fsspec
import xarray as xr
from xarray.backends import NetCDF4DataStore

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

# step 1: the attributes CF defines (units compared lower-case with spaces as _, CF 4.1-4.4)
_LAT_UNITS = {"degrees_north", "degree_north", "degree_n", "degrees_n", "degreen", "degreesn"}
_LON_UNITS = {"degrees_east", "degree_east", "degree_e", "degrees_e", "degreee", "degreese"}
_DEGREES = {"degree", "degrees", "deg", "degs"}  # an X/Y axis in these is longitude/latitude
_VERTICAL_NAMES = {"depth", "height", "altitude", "sea_water_pressure", "depth_below_geoid",
                   "height_above_mean_sea_level", "height_above_geopotential_datum",
                   "height_above_reference_ellipsoid"}
_ROTATED_NAMES = {"grid_latitude": "y", "grid_longitude": "x", "projection_y_coordinate": "y",
                  "projection_x_coordinate": "x", "projection_y_angular_coordinate": "y",
                  "projection_x_angular_coordinate": "x"}  # horizontal, but not latitude/longitude
# metres of depth per unit; pressure is taken as depth, 1 dbar ~ 1 m of sea water: depth is about 1 %
# less than pressure at 1000 dbar and 2 % at 5000 dbar (Saunders 1981), within a level's spacing there
_LENGTH_UNITS = {"m": 1.0, "meter": 1.0, "meters": 1.0, "metre": 1.0, "metres": 1.0, "km": 1000.0,
                 "kilometer": 1000.0, "kilometers": 1000.0, "kilometre": 1000.0, "kilometres": 1000.0,
                 "cm": 0.01, "centimeter": 0.01, "centimeters": 0.01}
_PRESSURE_UNITS = {"dbar": 1.0, "decibar": 1.0, "decibars": 1.0, "bar": 10.0, "bars": 10.0,
                   "pa": 1e-4, "pascal": 1e-4, "pascals": 1e-4, "hpa": 0.01, "mbar": 0.01, "millibar": 0.01,
                   "kpa": 0.1}
_SINCE = re.compile(r"^\s*\w+\s+since\s+", re.IGNORECASE)
# step 2: cf_xarray's keys -> our kinds ("x"/"y": a horizontal axis that is not longitude/latitude)
_CF_COORDINATES = {"latitude": "lat", "longitude": "lon", "vertical": "depth", "time": "time"}
_CF_AXES = {"X": "x", "Y": "y", "Z": "depth", "T": "time"}
# step 3: names products use, compared without case
_NAMES: dict[str, tuple[str, ...]] = {
    "lat": ("lat", "latitude", "y", "nav_lat", "lats", "yt_ocean", "lat_rho"),
    "lon": ("lon", "longitude", "x", "nav_lon", "long", "lons", "xt_ocean", "lon_rho"),
    "depth": ("depth", "lev", "level", "z", "zlev", "deptht", "depthu", "depthv", "depthw", "st_ocean", "pres"),
    "time": ("time", "t", "time_counter", "juld", "date"),
}
AXIS_ORDER = ("time", "depth", "lat", "lon")  # a curvilinear grid: time, depth, y, x
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
    Anything else fails with one line naming the file and what is wrong with it.
    """
    return open_grid_to_keep(path, storage_options=storage_options)[0]


def _no_files() -> None:
    """A Zarr grid holds no file open between reads."""


def open_grid_to_keep(path: str, *, storage_options: dict | None = None) -> tuple[xr.Dataset, Callable[[], None]]:
    """``open_grid``, and a function that closes the files the dataset holds until its next read
    (xarray reopens a NetCDF file when a value is read again): a dataset kept open between tasks
    holds no file handle, and no HDF5 lock that would stop the file being rewritten meanwhile."""
    path = str(path)
    where = redact(path)
    so = storage_options or {}
    try:
        is_zarr = _is_zarr(path, so)
    except (OSError, ValueError) as e:  # a malformed URL, an unreachable store
        raise InputError(f"{where}: cannot reach it ({one_line(e, 160)})") from None
    if is_zarr:
        kwargs = dict(chunks=None, decode_times=False, decode_timedelta=False, storage_options=so or None)
        try:
            try:
                return xr.open_zarr(path, consolidated=True, **kwargs), _no_files
            except (KeyError, ValueError, FileNotFoundError):  # no consolidated metadata: list the store
                return xr.open_zarr(path, consolidated=False, **kwargs), _no_files
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{where}: not a readable Zarr grid ({one_line(e, 160)})") from None
    protocol = fsspec.utils.get_protocol(path)
    local = path
    if protocol in ("file", "local") and os.path.isdir(path):
        raise InputError(f"{where}: not a NetCDF or Zarr grid (a folder without zarr.json or .zgroup)")
    try:
        if protocol not in ("file", "local"):
            local = fsspec.open_local(f"simplecache::{path}", **({protocol: so} if so else {}))
        # netCDF4's own store (what engine="netcdf4" opens; not xarray's guess over its engines, which
        # ends in a list of them, not in the reason), kept so that its file can be closed and reopened
        store = NetCDF4DataStore.open(local, mode="r")
        try:
            return xr.open_dataset(store, decode_times=False, decode_timedelta=False), store.close
        except BaseException:
            store.close()
            raise
    except FileNotFoundError:
        raise InputError(f"{where}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{where}: not a NetCDF or Zarr grid (netCDF4 cannot read it: {_reason(e, local)})") from None


def _reason(error: Exception, local: str) -> str:
    """netCDF4's message without its errno and the file name (the message names the file first)."""
    text = one_line(error, 1000)
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text)
    text = text.replace(f": {local!r}", "").replace(f": b{local!r}", "").replace(f": {local}", "")
    return one_line(text, 160)


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


@dataclass(frozen=True)
class GridAxes:
    """Where a variable's axes are: ``dims`` maps time, depth and lat, lon (regular grid) or y, x
    (curvilinear grid: the two dimensions of its 2-D latitude and longitude) to the variable's
    dimensions; ``coords`` maps time, depth, lat and lon to the coordinate holding their values."""

    dims: dict[str, str]
    coords: dict[str, str]

    @property
    def curvilinear(self) -> bool:
        return "y" in self.dims


def _norm_units(coord: xr.DataArray) -> str:
    return str(coord.attrs.get("units", "")).strip().lower().replace(" ", "_")


def _cf_kind(coord: xr.DataArray) -> str | None:
    """Step 1: what the CF attributes say the coordinate is (lat, lon, depth, time, or x/y for a
    rotated or projected horizontal axis), in CF's order: standard_name, units, positive, axis."""
    attrs = coord.attrs
    standard = str(attrs.get("standard_name", "")).strip().lower()
    units = _norm_units(coord)
    if standard == "latitude" or units in _LAT_UNITS:
        return "lat"
    if standard == "longitude" or units in _LON_UNITS:
        return "lon"
    if standard in _ROTATED_NAMES:
        return _ROTATED_NAMES[standard]
    if standard == "time" or _SINCE.match(str(attrs.get("units", ""))):
        return "time"
    if standard in _VERTICAL_NAMES or units in _PRESSURE_UNITS:
        return "depth"
    if str(attrs.get("positive", "")).strip().lower() in ("up", "down"):
        return "depth"
    axis = str(attrs.get("axis", "")).strip().upper()
    if axis in ("X", "Y"):  # in degrees or without units: longitude/latitude; in metres: projected
        return ("lon" if axis == "X" else "lat") if units in _DEGREES or not units else axis.lower()
    return {"Z": "depth", "T": "time"}.get(axis)


def _cf_xarray_kinds(da: xr.DataArray) -> dict[str, str]:
    """Step 2: {coordinate: kind} from cf_xarray's criteria (it reads the variable's ``coordinates``
    attribute too); geographic keys (latitude ...) win over axes (X ...) for the same coordinate.

    An X or Y axis counts as longitude or latitude only in degrees: cf_xarray also calls X a
    coordinate whose long_name is "cell index along first dimension"; without units it is left to
    the name table."""
    kinds: dict[str, str] = {}
    for key, names in da.cf.coordinates.items():
        for name in names:
            kinds.setdefault(str(name), _CF_COORDINATES[key])
    for key, names in da.cf.axes.items():
        for name in names:
            kind = _CF_AXES[key]
            if kind in ("x", "y") and name in da.coords:
                units = _norm_units(da.coords[name])
                if not units:
                    continue
                if units in _DEGREES:
                    kind = "lon" if kind == "x" else "lat"
            kinds.setdefault(str(name), kind)
    return kinds


def _name_kind(name: str) -> str | None:
    """Step 3: the table of names products use."""
    lowered = name.lower()
    for kind, names in _NAMES.items():
        if lowered in names:
            return kind
    return None


def _candidates(da: xr.DataArray) -> dict[str, xr.DataArray]:
    """The coordinates that may hold the variable's axes: its index coordinates and, when it names
    them (CF ``coordinates`` attribute, kept by xarray in ``encoding``), those; else all of its
    coordinates. Scalars are skipped (a scalar time or depth says where a 2-D field is)."""
    coords = dict(da.coords.items())  # not da.coords.get: it invents a range for a dimension without one
    named = str(da.attrs.get("coordinates") or da.encoding.get("coordinates") or "").split()
    keep = set(map(str, da.dims)) | set(named) if named else set(map(str, coords))
    return {str(k): c for k, c in coords.items() if str(k) in keep and c.ndim > 0}


def find_axes(da: xr.DataArray, *, where: str = "grid") -> GridAxes:
    """The variable's axes: time, depth, and lat/lon (1-D, a regular grid) or y/x under 2-D lat/lon
    (a curvilinear grid).

    Raises InputError for a dimension of more than one step that is none of them, a missing
    latitude or longitude, or latitude and longitude that make neither kind of grid.
    """
    candidates = _candidates(da)
    cf_kinds = _cf_xarray_kinds(da)
    kinds: dict[str, str | None] = {}
    step: dict[str, int] = {}  # which of the three steps identified it
    for name, coord in candidates.items():
        answers = (_cf_kind(coord), cf_kinds.get(name), _name_kind(name))  # first that knows wins
        step[name] = next((i for i, kind in enumerate(answers) if kind), len(answers))
        kinds[name] = answers[step[name]] if step[name] < len(answers) else None
    dims: dict[str, str] = {}
    coords: dict[str, str] = {}
    lat, lon = _pick(kinds, step, candidates, "lat"), _pick(kinds, step, candidates, "lon")
    if lat is not None and lon is not None:
        lat_dims, lon_dims = candidates[lat].dims, candidates[lon].dims
        if len(lat_dims) == len(lon_dims) == 1 and lat_dims != lon_dims:
            dims["lat"], dims["lon"] = str(lat_dims[0]), str(lon_dims[0])
        elif len(lat_dims) == 2 and lat_dims == lon_dims:
            dims["y"], dims["x"] = map(str, lat_dims)
        elif not (len(lat_dims) == len(lon_dims) == 1):
            raise InputError(f"{where}: latitude {lat!r} {lat_dims} and longitude {lon!r} {lon_dims} are neither "
                             "1-D along two dimensions (a regular grid) nor 2-D along the same two (curvilinear)")
        # else both along one dimension: points of a profile or track file, not a grid (refused below)
        if dims:
            coords["lat"], coords["lon"] = lat, lon
    horizontal = set(dims.values())
    for dim in map(str, da.dims):
        if dim in horizontal:
            continue
        along = {name: kinds[name] for name, c in candidates.items() if c.dims == (dim,)}
        axis = along.get(dim) or next((k for k in along.values() if k in ("time", "depth")), None)
        if axis in ("x", "y") and da.sizes[dim] > 1:
            raise InputError(f"{where}: dimension {dim!r} is a rotated or projected axis, and no 2-D latitude and "
                             "longitude are named by the variable's 'coordinates' attribute")
        if dim not in candidates and axis is None:
            axis = _name_kind(dim)
            if axis in ("lat", "lon") and "lat" not in coords:
                two_d = [str(c) for c in da.coords if da.coords[c].ndim == 2]
                raise InputError(f"{where}: dimension {dim!r} has no coordinate and no latitude/longitude "
                                 f"(2-D here: {', '.join(two_d) or 'none'}) is named by the variable's "
                                 "'coordinates' attribute, as CF has a curvilinear grid say where its cells are")
        if axis not in ("time", "depth") or axis in dims:
            if da.sizes[dim] == 1:
                continue
            raise InputError(f"{where}: dimension {dim!r} ({da.sizes[dim]} steps) is not lat, lon, depth or time")
        dims[axis] = dim
        # the index coordinate first; for time one in '<unit> since <date>' (NEMO's time_counter has
        # only axis: T, its time_centered the units)
        names = [name for name, kind in along.items() if kind == axis]
        names.sort(key=lambda n: (axis == "time" and not _SINCE.match(str(candidates[n].attrs.get("units", ""))),
                                  n != dim))
        if names:
            coords[axis] = names[0]
    if "lat" not in coords:
        for axis in ("lat", "lon"):
            if axis not in dims:
                raise InputError(f"{where}: no {axis} dimension among {list(map(str, da.dims))}")
    return GridAxes(dims, coords)


def _pick(kinds: dict[str, str | None], step: dict[str, int], candidates: dict[str, xr.DataArray],
          kind: str) -> str | None:
    """The coordinate of that kind identified by the earliest step (CF attributes beat a name: integer
    ``y``/``x`` indices under a curvilinear grid's 2-D latitude are not latitudes), then with the fewest
    dimensions, an index coordinate first (a 1-D latitude beats a 2-D copy: the regular lookup is cheaper)."""
    names = [name for name, k in kinds.items() if k == kind]
    names.sort(key=lambda n: (step[n], candidates[n].ndim, n not in candidates[n].dims, n))
    return names[0] if names else None


def detect_axes(da: xr.DataArray, *, where: str = "grid") -> dict[str, str]:
    """{axis: dimension} for the variable's dimensions (``find_axes(da).dims``): time, depth and lat,
    lon, or y, x for a curvilinear grid."""
    return find_axes(da, where=where).dims


def vertical_metres(coord: xr.DataArray, *, where: str = "grid") -> float:
    """Metres of depth per unit of a vertical coordinate: a length, or a pressure taken as 1 dbar =
    1 m (see ``_PRESSURE_UNITS``); no units: metres, as products without them mean.

    Raises InputError for a parametric coordinate (sigma, s-levels: CF ``formula_terms``, depths
    to be computed from the bathymetry) or other units (model level numbers)."""
    standard = str(coord.attrs.get("standard_name", ""))
    units = _norm_units(coord)
    if "formula_terms" in coord.attrs or standard.endswith("_coordinate") or standard == "model_level_number":
        raise InputError(f"{where}: vertical coordinate {coord.name!r} ({standard or 'formula_terms'}) is parametric: "
                         "its depths in metres must be computed first (CF formula_terms)")
    if not units:
        return 1.0
    if units in _LENGTH_UNITS:
        return _LENGTH_UNITS[units]
    if units in _PRESSURE_UNITS:
        return _PRESSURE_UNITS[units]
    raise InputError(f"{where}: vertical coordinate {coord.name!r} has units {coord.attrs.get('units')!r}, "
                     "not a length or a pressure")
