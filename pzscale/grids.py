"""Ocean grids for the environmental join: open, name the variable and its axes, look up points.

- ``open_grid`` opens NetCDF (netCDF-4 or classic) or Zarr, local or on object storage, lazily:
  CF masking and scaling are applied, times are decoded here (``TimeAxis``) so that cftime
  calendars (a climatology's year 0001, ``360_day``) never reach pandas.
- ``VARIABLE_MAP`` maps the names users join (``sst``, ``thetao``, ``so``, ``chlor_a`` ...) to the
  variable names and CF standard names products use; ``detect_axes`` finds lat/latitude/Y,
  lon/longitude/X, depth/lev/Z and time by attributes first, then by name.
- ``Grid.join`` is the vectorised nearest-cell lookup: index arithmetic on regular 1-D axes
  (``np.searchsorted`` on irregular ones), longitudes compared on the circle (0..360 and
  -180..180 grids, the seam, boxes straddling 0), per-dimension tolerances, depth as the nearest
  level or the mean over a depth range, time as the nearest step or the month of year, land
  (NaN) cells optionally replaced by the nearest valid cell within a radius
  (``scipy.spatial.cKDTree`` on the unit sphere). Only the box of the grid the points need is
  read, a few time steps at a time, so memory stays bounded; a worker process keeps recently
  read boxes (``PZSCALE_GRID_CACHE_BYTES``, default 512 MiB) keyed by the grid file's identity,
  so shards whose points span the globe do not each decompress the whole grid again.
- ``synthetic_grid`` writes a small global grid with known values for demos and tests.

Every point gets a QC flag (``QC_VALUES``): ok, out_of_range (outside a tolerance), land_filled,
no_data (the cell is NaN and no fill was asked or found), no_position (lat/lon, or the time or
depth the grid needs, unknown).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import cftime
import fsspec
import numpy as np
import xarray as xr
from scipy.spatial import cKDTree

from pzscale.errors import InputError, one_line
from pzscale.schema import TIME_FILL

QC_OK, QC_OUT_OF_RANGE, QC_LAND_FILLED, QC_NO_DATA, QC_NO_POSITION = range(5)
QC_VALUES = ("ok", "out_of_range", "land_filled", "no_data", "no_position")

EARTH_RADIUS_KM = 6371.0088
MS_PER_DAY = 86_400_000

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
_TIME_UNIT_DAYS = {"day": 1.0, "hour": 1 / 24, "minute": 1 / 1440, "second": 1 / 86400, "millisecond": 1 / 86_400_000,
                   "microsecond": 1 / 86_400_000_000, "week": 7.0}


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


# ---------------------------------------------------------------- time


@dataclass(frozen=True)
class TimeAxis:
    """A grid's time axis: ``values`` in days since the axis's own reference, in its calendar."""

    units: str
    calendar: str
    values: np.ndarray  # float64 days
    months: np.ndarray  # month of year of each step
    climatology: bool

    @classmethod
    def of(cls, coord: xr.DataArray, *, where: str = "grid") -> TimeAxis:
        units = str(coord.attrs.get("units", ""))
        calendar = str(coord.attrs.get("calendar", "standard")).lower()
        match = re.match(r"\s*(\w+?)s?\s+since\s+", units)
        if not match or match.group(1).lower() not in _TIME_UNIT_DAYS:
            raise InputError(f"{where}: time coordinate {coord.name!r} has units {units!r}, not '<unit> since <date>'")
        raw = np.asarray(coord.values, dtype=np.float64)
        try:
            dates = cftime.num2date(raw, units, calendar=calendar, only_use_cftime_datetimes=True)
        except (ValueError, TypeError) as e:
            raise InputError(f"{where}: cannot decode time {units!r} ({calendar}): {one_line(e)}") from None
        dates = np.atleast_1d(dates)
        months = np.array([d.month for d in dates], dtype=np.int64)
        years = {d.year for d in dates}
        # CF marks climatologies with a ``climatology`` attribute; placeholder years (0, 1) say so too
        climatology = "climatology" in coord.attrs or (len(years) == 1 and max(years) <= 1)
        return cls(units, calendar, raw * _TIME_UNIT_DAYS[match.group(1).lower()], months, climatology)

    def days_of(self, time_ms: np.ndarray) -> np.ndarray:
        """Catalog times (int64 ms since 1970 UTC, ``TIME_FILL`` = unknown) as days on this axis.

        A date is carried over by its calendar fields (a 31st becomes the 30th in ``360_day``);
        cftime objects are built once per distinct day, so a shard costs a few hundred of them.
        """
        ms = np.asarray(time_ms, dtype=np.int64)
        out = np.full(ms.shape, np.nan)
        known = ms != TIME_FILL
        if not known.any():
            return out
        day = np.floor_divide(ms[known], MS_PER_DAY)
        fraction = (ms[known] - day * MS_PER_DAY) / MS_PER_DAY
        unique_days, inverse = _unique_inverse(day)
        dates = unique_days.astype("datetime64[D]")
        years = dates.astype("datetime64[Y]").astype(np.int64) + 1970
        months = dates.astype("datetime64[M]").astype(np.int64) % 12 + 1
        days = (dates - dates.astype("datetime64[M]")).astype(np.int64) + 1
        objects = [_calendar_date(int(y), int(m), int(d), self.calendar) for y, m, d in zip(years, months, days,
                                                                                            strict=True)]
        match = re.match(r"\s*(\w+?)s?\s+since\s+", self.units)
        factor = _TIME_UNIT_DAYS[match.group(1).lower()]
        numbers = np.asarray(cftime.date2num(objects, self.units, calendar=self.calendar), dtype=np.float64)
        out[known] = numbers[inverse] * factor + fraction
        return out


def _unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` for integers within a modest range (days of a
    catalog's span), by a presence table instead of a sort: linear in the number of points."""
    low, high = int(values.min()), int(values.max())
    if high - low > 50_000_000:
        return np.unique(values, return_inverse=True)
    present = np.zeros(high - low + 1, dtype=bool)
    present[values - low] = True
    rank = np.cumsum(present) - 1
    return np.flatnonzero(present) + low, rank[values - low]


def _calendar_date(year: int, month: int, day: int, calendar: str) -> cftime.datetime:
    for d in range(day, 27, -1):
        try:
            return cftime.datetime(year, month, d, calendar=calendar)
        except ValueError:
            continue
    return cftime.datetime(year, month, min(day, 28), calendar=calendar)


def months_of(time_ms: np.ndarray) -> np.ndarray:
    """Month of year (1..12) of catalog times; 0 where unknown."""
    ms = np.asarray(time_ms, dtype=np.int64)
    months = ms.astype("datetime64[ms]").astype("datetime64[M]").astype(np.int64) % 12 + 1
    return np.where(ms == TIME_FILL, 0, months)


def as_time_ms(values: Any) -> np.ndarray:
    """int64 ms since 1970 UTC from datetime64 or int64 ms (NaT -> ``TIME_FILL``)."""
    arr = np.asarray(values)
    if arr.dtype.kind == "M":
        return arr.astype("datetime64[ms]").astype(np.int64)  # NaT is int64 min, our fill
    return arr.astype(np.int64)


# ---------------------------------------------------------------- nearest lookup kernels


@dataclass(frozen=True)
class Axis:
    """A 1-D coordinate sorted for ``np.searchsorted``: ``order[i]`` is the grid index of ``values[i]``."""

    dim: str
    values: np.ndarray
    order: np.ndarray
    step: float
    monotonic: bool
    regular: float | None = None  # the step when index arithmetic applies

    @classmethod
    def of(cls, dim: str, coord: np.ndarray) -> Axis:
        coord = np.asarray(coord, dtype=np.float64)
        order = np.argsort(coord, kind="stable")
        values = coord[order]
        diffs = np.diff(values)
        step = float(np.median(diffs)) if len(diffs) else math.inf
        d = np.diff(coord)
        return cls(dim, values, order, step, bool(np.all(d > 0) or np.all(d < 0)), regular_step(values))

    def nearest(self, x: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
        """Grid index of the nearest coordinate to each ``x`` and whether it is within ``tolerance``.

        Ties go to the larger coordinate, as ``pandas.Index.get_indexer(method="nearest")`` does.
        """
        pos, dist = nearest_sorted(self.values, x, self.regular)
        return self.order[pos], dist <= tolerance


def regular_step(values: np.ndarray) -> float | None:
    """The spacing of an ascending axis whose every value lies within a quarter step of
    ``values[0] + k * step`` (so the nearest index is ``rint`` of the position or its neighbour),
    else None. Monthly time axes (28 to 31 days) qualify too."""
    n = len(values)
    if n < 3:
        return None
    step = (values[-1] - values[0]) / (n - 1)
    if not step > 0:
        return None
    drift = np.abs(values - (values[0] + np.arange(n) * step)).max()
    return float(step) if drift <= 0.25 * step else None


def nearest_sorted(values: np.ndarray, x: np.ndarray, step: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Position in ascending ``values`` nearest each ``x``, and the distance (NaN x: inf).

    With the axis's ``regular_step`` the position is index arithmetic (``rint``) checked against
    the neighbour on the point's side, about ten times faster than a binary search; otherwise
    ``np.searchsorted``. Ties go to the larger coordinate either way.
    """
    n = len(values)
    x = np.asarray(x, dtype=np.float64)
    if step:
        guess = np.clip(np.nan_to_num(np.rint((x - values[0]) / step), nan=0.0), 0, n - 1).astype(np.int64)
        dist = np.abs(x - values[guess])
        other = np.clip(guess + np.where(x > values[guess], 1, -1), 0, n - 1)
        d_other = np.abs(x - values[other])
        take = (d_other < dist) | ((d_other == dist) & (other > guess))
        best, dist = np.where(take, other, guess), np.where(take, d_other, dist)
    else:
        pos = np.searchsorted(values, x)
        lo, hi = np.clip(pos - 1, 0, n - 1), np.clip(pos, 0, n - 1)
        d_lo, d_hi = np.abs(x - values[lo]), np.abs(values[hi] - x)
        best = np.where(d_hi <= d_lo, hi, lo)
        dist = np.where(d_hi <= d_lo, d_hi, d_lo)
    return best, np.where(np.isnan(dist), np.inf, dist)


@dataclass(frozen=True)
class LonAxis:
    """Longitudes compared on the circle: coordinates and points both taken modulo 360 and the
    sorted axis padded with one wrapped cell at each end, so that 359.8 and -0.2 both find a cell
    at 0/360, whichever convention (0..360, -180..180, past 360, straddling 0) the grid uses."""

    dim: str
    values: np.ndarray  # padded, ascending, in [0, 360) plus the two wrapped cells
    order: np.ndarray
    step: float
    monotonic: bool
    is_global: bool
    regular: float | None = None

    @classmethod
    def of(cls, dim: str, coord: np.ndarray) -> LonAxis:
        raw = np.asarray(coord, dtype=np.float64)
        wrapped = np.mod(raw, 360.0)
        order = np.argsort(wrapped, kind="stable")
        values = wrapped[order]
        gaps = np.diff(values)
        step = float(np.median(np.abs(np.diff(raw)))) if len(raw) > 1 else math.inf
        # global when the largest gap on the circle is about one step
        circle_gap = 360.0 - values[-1] + values[0]
        is_global = len(raw) > 1 and max(float(gaps.max(initial=0.0)), circle_gap) <= 1.5 * step
        padded = np.r_[values[-1] - 360.0, values, values[0] + 360.0]
        padded_order = np.r_[order[-1], order, order[0]]
        d = np.diff(raw)
        return cls(dim, padded, padded_order, step, bool(np.all(d > 0) or np.all(d < 0)), bool(is_global),
                   regular_step(padded))

    def nearest(self, lon: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
        pos, dist = nearest_sorted(self.values, np.mod(np.asarray(lon, dtype=np.float64), 360.0), self.regular)
        return self.order[pos], dist <= tolerance


def unit_vectors(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """(n, 3) points on the unit sphere, for chord-distance KD-trees."""
    phi, lam = np.radians(lat), np.radians(lon)
    return np.column_stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)])


def chord_of_km(km: float) -> float:
    return 2.0 * math.sin(min(km / EARTH_RADIUS_KM, math.pi) / 2.0)


# ---------------------------------------------------------------- the join


@dataclass(frozen=True)
class JoinOptions:
    """How points meet cells. ``None`` tolerances default to one grid step (lat, lon, time) or
    the largest spacing between depth levels; ``land_fill_km`` switches the land fill on."""

    lat_tolerance: float | None = None  # degrees
    lon_tolerance: float | None = None  # degrees
    depth: str = "nearest"  # nearest level to the middle of the image's range, or "mean" over the range
    depth_tolerance: float | None = None  # m
    time: str = "auto"  # auto: month of year for climatologies, else nearest; or "nearest" / "month"
    time_tolerance_days: float | None = None
    land_fill_km: float | None = None
    celsius: bool = True  # kelvin -> degC
    max_box_bytes: int = 256 * 2**20  # grid values read at once per batch of time steps

    def __post_init__(self) -> None:
        if self.depth not in ("nearest", "mean"):
            raise InputError(f"depth must be 'nearest' or 'mean', not {self.depth!r}")
        if self.time not in ("auto", "nearest", "month"):
            raise InputError(f"time must be 'auto', 'nearest' or 'month', not {self.time!r}")
        for name in ("lat_tolerance", "lon_tolerance", "depth_tolerance", "time_tolerance_days", "land_fill_km"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise InputError(f"{name} must be >= 0, not {value}")

    def record(self) -> dict:
        out = asdict(self)
        out.pop("max_box_bytes")  # changes memory, never results
        return out


@dataclass
class _Lookup:
    """Per-point grid indices (original order) for each active axis, and the QC so far."""

    index: dict[str, np.ndarray]
    depth_range: tuple[np.ndarray, np.ndarray] | None  # sorted-level positions [k0, k1] for depth="mean"
    qc: np.ndarray


class Grid:
    """One variable of a gridded product, ready for nearest lookups.

    Only the coordinates are read when it is made; ``join`` reads the boxes its points need.
    """

    def __init__(self, da: xr.DataArray, *, source: str = "", options: JoinOptions | None = None,
                 identity: tuple | None = None):
        self.options = options or JoinOptions()
        self.source = redact(source)
        self._cache_key = identity  # boxes read are cached per process only for a grid with an identity
        where = f"{self.source or 'grid'}: {da.name}"
        axes = detect_axes(da, where=where)
        drop = {d: 0 for d in map(str, da.dims) if d not in axes.values()}  # length-1 extras (zlev, ...)
        self.time: TimeAxis | None = None
        self.time_mode = "none"
        if "time" in axes:
            coord = dict(da.coords.items()).get(axes["time"])
            if da.sizes[axes["time"]] == 1 and self.options.time == "auto":
                drop[axes.pop("time")] = 0  # one step (a snapshot, a scalar date): valid at any time
            else:
                if coord is None:
                    raise InputError(f"{where}: time dimension {axes['time']!r} has no coordinate")
                self.time = TimeAxis.of(coord, where=where)
                self.time_mode = ("month" if self.options.time == "month" or
                                  (self.options.time == "auto" and self.time.climatology) else "nearest")
                if self.time_mode == "month":
                    months = self.time.months
                    if len(set(months.tolist())) != len(months):
                        raise InputError(f"{where}: time='month' needs one step per month of year; "
                                         f"the axis has {len(months)} steps")
        if "depth" in axes and da.sizes[axes["depth"]] == 1:
            drop[axes.pop("depth")] = 0  # one level: a surface (or single-layer) product
        self.time_axis = Axis.of("time", self.time.values) if self.time is not None else None
        self.da = da.isel(drop).transpose(*[axes[a] for a in AXIS_ORDER if a in axes])
        self.axes = axes
        self.name = str(da.name)
        self.lat = Axis.of(axes["lat"], da.coords[axes["lat"]].values)
        self.lon = LonAxis.of(axes["lon"], da.coords[axes["lon"]].values)
        self.depth: Axis | None = None
        if "depth" in axes:
            coord = da.coords[axes["depth"]]
            levels = np.asarray(coord.values, dtype=np.float64)
            if str(coord.attrs.get("positive", "")).lower() == "up" or (levels.max() <= 0 and levels.min() < 0):
                levels = -levels  # heights: depth is positive down
            self.depth = Axis.of(axes["depth"], levels)
        self.source_units = str(da.attrs.get("units", ""))
        self.kelvin = self.options.celsius and self.source_units.strip().lower() in KELVIN_UNITS
        self.units = "degC" if self.kelvin else self.source_units

    @classmethod
    @contextmanager
    def open(cls, path: str, variable: str, *, storage_options: dict | None = None,
             options: JoinOptions | None = None) -> Iterator[Grid]:
        """``with Grid.open(path, "sst") as grid:`` the named (or aliased) variable of a file."""
        with opened(path, storage_options=storage_options) as ds:
            name = resolve_variable(ds, variable, where=redact(path))
            yield cls(ds[name], source=str(path), options=options, identity=file_identity(path, storage_options))

    # ------------------------------------------------------------ tolerances and description

    def tolerances(self) -> dict[str, float]:
        o = self.options
        tol = {"lat": o.lat_tolerance if o.lat_tolerance is not None else self.lat.step,
               "lon": o.lon_tolerance if o.lon_tolerance is not None else self.lon.step}
        if self.depth is not None:
            spacing = float(np.diff(self.depth.values).max()) if len(self.depth.values) > 1 else math.inf
            tol["depth"] = o.depth_tolerance if o.depth_tolerance is not None else spacing
        if self.time is not None and self.time_mode == "nearest":
            step = self.time_step_days()
            tol["time_days"] = o.time_tolerance_days if o.time_tolerance_days is not None else step
        return {k: float(v) for k, v in tol.items()}

    def time_step_days(self) -> float:
        values = np.sort(self.time.values) if self.time is not None else np.zeros(0)
        return float(np.median(np.diff(values))) if len(values) > 1 else 1.0

    def describe(self) -> dict:
        """What a joined value means: for the attributes of the output arrays (no credentials)."""
        depth = ("none (single level or no depth axis)" if self.depth is None else
                 "mean over the levels within [depth_min, depth_max], else the level nearest its middle"
                 if self.options.depth == "mean" else "level nearest the middle of [depth_min, depth_max]")
        time = {"none": "none (no time axis, or a single step valid at any time)",
                "month": "month of year (climatology)", "nearest": "nearest step"}[self.time_mode]
        return {"grid": self.source, "variable": self.name, "units": self.units, "source_units": self.source_units,
                "standard_name": str(self.da.attrs.get("standard_name", "")),
                "long_name": str(self.da.attrs.get("long_name", "")),
                "method": "nearest cell (longitude on the circle)", "depth_method": depth, "time_method": time,
                "tolerances": self.tolerances(), "land_fill_km": self.options.land_fill_km,
                "qc_values": list(QC_VALUES)}

    # ------------------------------------------------------------ lookup

    def _locate(self, lat: np.ndarray, lon: np.ndarray, depth_min: np.ndarray, depth_max: np.ndarray,
                time_ms: np.ndarray) -> _Lookup:
        tol = self.tolerances()
        known = np.isfinite(lat) & np.isfinite(lon)
        if self.time is not None:
            known &= time_ms != TIME_FILL
        has_depth = np.isfinite(depth_min) | np.isfinite(depth_max)
        if self.depth is not None:
            known &= has_depth
        qc = np.where(known, QC_OK, QC_NO_POSITION).astype(np.int8)
        index: dict[str, np.ndarray] = {}
        index["lat"], ok = self.lat.nearest(lat, tol["lat"])
        index["lon"], ok_lon = self.lon.nearest(lon, tol["lon"])
        ok &= ok_lon
        if self.time is not None:
            if self.time_mode == "month":
                by_month = np.full(13, -1, np.int64)
                by_month[self.time.months] = np.arange(len(self.time.months))
                index["time"] = by_month[months_of(time_ms)]
                ok &= index["time"] >= 0
            else:
                index["time"], ok_time = self.time_axis.nearest(self.time.days_of(time_ms), tol["time_days"])
                ok &= ok_time
            index["time"] = np.where(index["time"] >= 0, index["time"], 0)
        depth_range = None
        if self.depth is not None:
            top = np.where(np.isfinite(depth_min), depth_min, depth_max).astype(np.float64)
            bottom = np.where(np.isfinite(depth_max), depth_max, depth_min).astype(np.float64)
            top, bottom = np.minimum(top, bottom), np.maximum(top, bottom)
            index["depth"], ok_depth = self.depth.nearest((top + bottom) / 2, tol["depth"])
            if self.options.depth == "mean":
                k0 = np.searchsorted(self.depth.values, top, side="left")
                k1 = np.searchsorted(self.depth.values, bottom, side="right") - 1
                within = (k0 <= k1) & has_depth
                # no level inside the range: the level nearest its middle
                inverse = np.empty_like(self.depth.order)
                inverse[self.depth.order] = np.arange(len(self.depth.order))
                nearest_pos = inverse[index["depth"]]
                k0, k1 = np.where(within, k0, nearest_pos), np.where(within, k1, nearest_pos)
                ok_depth |= within
                depth_range = (k0, k1)
            ok &= ok_depth
        qc[known & ~ok] = QC_OUT_OF_RANGE
        return _Lookup(index, depth_range, qc)

    def join(self, lat: Any, lon: Any, *, depth_min: Any = None, depth_max: Any = None,
             time: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Values (float32, NaN unless ok or land_filled) and QC strings at each point.

        ``time`` is int64 ms since 1970 UTC (``TIME_FILL`` unknown) or datetime64; depths in m.
        """
        lat = np.asarray(lat, dtype=np.float64)
        lon = np.asarray(lon, dtype=np.float64)
        n = len(lat)
        depth_min = np.full(n, np.nan) if depth_min is None else np.asarray(depth_min, dtype=np.float64)
        depth_max = depth_min if depth_max is None else np.asarray(depth_max, dtype=np.float64)
        time_ms = np.full(n, TIME_FILL, np.int64) if time is None else as_time_ms(time)
        found = self._locate(lat, lon, depth_min, depth_max, time_ms)
        values = np.full(n, np.nan, np.float64)
        todo = np.flatnonzero(found.qc == QC_OK)
        for batch in self._batches(found, todo):
            values[batch], found.qc[batch] = self._gather(found, batch, lat[batch], lon[batch])
        if self.kelvin:
            values -= 273.15
        return values.astype(np.float32), np.asarray(QC_VALUES, dtype=object)[found.qc]

    def _batches(self, found: _Lookup, todo: np.ndarray) -> Iterator[np.ndarray]:
        """Points grouped by time step, a few steps per batch so one box stays under max_box_bytes."""
        if not len(todo):
            return
        if "time" not in found.index:
            yield todo
            return
        steps = found.index["time"][todo]
        per_step = self.da.dtype.itemsize * math.prod(self.da.shape[1:])
        per_batch = max(1, self.options.max_box_bytes // max(per_step, 1))
        if int(steps.max()) - int(steps.min()) < per_batch:  # every step in one box: no need to sort
            yield todo
            return
        order = np.argsort(steps, kind="stable")
        todo, steps = todo[order], steps[order]
        cuts = np.flatnonzero(np.diff(steps)) + 1
        starts = np.r_[0, cuts]
        for i in range(0, len(starts), per_batch):
            a = starts[i]
            b = starts[i + per_batch] if i + per_batch < len(starts) else len(todo)
            yield todo[a:b]

    def _read(self, select: dict[str, Any]) -> np.ndarray:
        """The box of values, from this process's cache when a task before read the same box of the
        same file (shards of points spread over the globe all read the whole grid)."""
        if self._cache_key is None:
            return np.asarray(self.da.isel(select).values)
        box = tuple((d, (v.start, v.stop) if isinstance(v, slice) else v.tobytes()) for d, v in sorted(select.items()))
        key = (*self._cache_key, self.name, box)
        block = _BOXES.get(key)
        if block is None:
            block = np.asarray(self.da.isel(select).values)
            _BOXES.put(key, block)
        return block

    def _window(self, axis: Axis | LonAxis, needed: np.ndarray, margin: int) -> tuple[Any, np.ndarray]:
        """What to read along an axis (a slice, or sorted indices) and each needed index's position in it."""
        size = len(axis.order) - (2 if isinstance(axis, LonAxis) else 0)
        if not axis.monotonic:
            picked = np.unique(needed) if not margin else np.arange(size)
            return picked, np.searchsorted(picked, needed)
        start, stop = int(needed.min()) - margin, int(needed.max()) + 1 + margin
        if isinstance(axis, LonAxis) and margin and axis.is_global and (start < 0 or stop > size):
            start, stop = 0, size  # a fill that may cross the seam: take the whole circle
        start, stop = max(start, 0), min(stop, size)
        return slice(start, stop), needed - start

    def _gather(self, found: _Lookup, batch: np.ndarray, lat: np.ndarray,
                lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = {k: v[batch] for k, v in found.index.items()}
        fill_km = self.options.land_fill_km
        margin_lat = margin_lon = 0
        if fill_km:
            margin_lat = math.ceil(fill_km / (111.2 * self.lat.step)) + 1
            coslat = max(math.cos(math.radians(min(89.0, float(np.abs(lat).max())))), 0.02)
            margin_lon = math.ceil(fill_km / (111.2 * self.lon.step * coslat)) + 1
        select: dict[str, Any] = {}
        local: dict[str, np.ndarray] = {}
        select[self.axes["lat"]], local["lat"] = self._window(self.lat, idx["lat"], margin_lat)
        select[self.axes["lon"]], local["lon"] = self._window(self.lon, idx["lon"], margin_lon)
        if "time" in idx:
            select[self.axes["time"]], local["time"] = _steps(idx["time"])
        k_range = None
        if self.depth is not None:
            if found.depth_range is not None:
                k0, k1 = found.depth_range[0][batch], found.depth_range[1][batch]
                first, last = int(k0.min()), int(k1.max())
                # levels in ascending depth order, so a range of levels is a slice of the block
                select[self.axes["depth"]] = self.depth.order[first : last + 1]
                k_range = (k0 - first, k1 - first)
            else:
                select[self.axes["depth"]], local["depth"] = _steps(idx["depth"])
        block = self._read(select)  # native dtype: only the gathered values become float64
        time_pos = local.get("time", np.zeros(len(batch), np.int64))
        if self.time is None:
            block = block[np.newaxis]
        if self.depth is None:
            block = block[:, np.newaxis]
            level_key = np.zeros(len(batch), np.int64)
        values: np.ndarray
        if k_range is not None:
            # mean over a range of levels per point: cumulative sums along depth, NaN levels skipped
            finite = np.isfinite(block)
            sums = np.concatenate([np.zeros(block[:, :1].shape), np.cumsum(np.where(finite, block, 0.0), 1,
                                                                            dtype=np.float64)], 1)
            counts = np.concatenate([np.zeros(block[:, :1].shape, np.int64), np.cumsum(finite, 1)], 1)
            a, b = k_range[0], k_range[1] + 1
            y, x = local["lat"], local["lon"]
            total = sums[time_pos, b, y, x] - sums[time_pos, a, y, x]
            count = counts[time_pos, b, y, x] - counts[time_pos, a, y, x]
            with np.errstate(invalid="ignore", divide="ignore"):
                values = np.where(count > 0, total / np.maximum(count, 1), np.nan)
            level_key = a * (block.shape[1] + 1) + b
        else:
            depth_pos = local.get("depth", np.zeros(len(batch), np.int64))
            values = block[time_pos, depth_pos, local["lat"], local["lon"]].astype(np.float64)
            if self.depth is not None:
                level_key = depth_pos
        qc = np.full(len(batch), QC_OK, np.int8)
        missing = np.isnan(values)
        qc[missing] = QC_NO_DATA
        if fill_km and missing.any():
            lat_box = self.da.coords[self.axes["lat"]].values[select[self.axes["lat"]]]
            lon_box = self.da.coords[self.axes["lon"]].values[select[self.axes["lon"]]]
            self._fill_from_nearest_valid(block, values, qc, missing, time_pos, level_key, k_range, lat, lon,
                                          np.asarray(lat_box, np.float64), np.asarray(lon_box, np.float64), fill_km)
        return values, qc

    def _fill_from_nearest_valid(self, block: np.ndarray, values: np.ndarray, qc: np.ndarray, missing: np.ndarray,
                                 time_pos: np.ndarray, level_key: np.ndarray, k_range: Any, lat: np.ndarray,
                                 lon: np.ndarray, lat_box: np.ndarray, lon_box: np.ndarray, km: float) -> None:
        """Replace NaN cells by the nearest finite cell of the same time/level within ``km`` (in place)."""
        grid_lat, grid_lon = np.meshgrid(lat_box, lon_box, indexing="ij")
        cells = unit_vectors(grid_lat.ravel(), grid_lon.ravel())
        chord = chord_of_km(km)
        pending = np.flatnonzero(missing)
        keys = np.stack([time_pos[pending], level_key[pending]], axis=1)
        for key in np.unique(keys, axis=0):
            members = pending[(keys == key).all(axis=1)]
            t = int(key[0])
            if k_range is not None:
                a, b = int(k_range[0][members[0]]), int(k_range[1][members[0]]) + 1
                layers = block[t, a:b]
                finite = np.isfinite(layers)
                count = finite.sum(0)
                with np.errstate(invalid="ignore", divide="ignore"):
                    field = np.where(count > 0, np.where(finite, layers, 0.0).sum(0) / np.maximum(count, 1), np.nan)
            else:
                field = block[t, int(key[1])]
            flat = field.ravel().astype(np.float64)
            valid = np.flatnonzero(np.isfinite(flat))
            if not len(valid):
                continue
            tree = cKDTree(cells[valid])
            dist, which = tree.query(unit_vectors(lat[members], lon[members]), distance_upper_bound=chord)
            hit = np.isfinite(dist)
            values[members[hit]] = flat[valid[which[hit]]]
            qc[members[hit]] = QC_LAND_FILLED


class _BoxCache:
    """Boxes of grid values read by this process, least recently used first out, within a byte budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.boxes: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.lock = threading.Lock()  # a worker may run several tasks in threads

    def get(self, key: tuple) -> np.ndarray | None:
        with self.lock:
            block = self.boxes.get(key)
            if block is not None:
                self.boxes.move_to_end(key)
            return block

    def put(self, key: tuple, block: np.ndarray) -> None:
        if block.nbytes > self.max_bytes:
            return
        block.setflags(write=False)  # shared between lookups: never modified in place
        with self.lock:
            self.boxes[key] = block
            while sum(b.nbytes for b in self.boxes.values()) > self.max_bytes:
                self.boxes.popitem(last=False)


# per worker process; env tasks run one after another on the same grid
_BOXES = _BoxCache(int(os.environ.get("PZSCALE_GRID_CACHE_BYTES", 512 * 2**20)))


def file_identity(path: str, storage_options: dict | None = None) -> tuple:
    """What names one version of a grid: the path with the size and modification time (local), or
    the URL with the ETag / modification time of the file or of the Zarr group's metadata (one HEAD
    request), so that a rewritten grid is never served from a worker's cache."""
    path = str(path)
    if fsspec.utils.get_protocol(path) in ("file", "local"):
        target = path
        for name in ("zarr.json", ".zgroup"):
            if os.path.isfile(os.path.join(path, name)):
                target = os.path.join(path, name)
        info = os.stat(target)
        return (os.path.abspath(target), info.st_size, info.st_mtime_ns)
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    target = root
    if not fs.isfile(root):
        target = f"{root}/zarr.json" if fs.exists(f"{root}/zarr.json") else f"{root}/.zgroup"
    info = fs.info(target)
    version = info.get("ETag") or info.get("LastModified") or info.get("mtime") or info.get("size")
    return (redact(path), str(version))


def _steps(needed: np.ndarray) -> tuple[Any, np.ndarray]:
    """What to read along time or depth, and each needed step's position in it: a slice when the
    steps are dense enough (one hyperslab read beats a list of indices in netCDF/HDF5)."""
    steps = np.unique(needed)
    first, last = int(steps[0]), int(steps[-1])
    if last - first + 1 <= 2 * len(steps) + 2:
        return slice(first, last + 1), needed - first
    return steps, np.searchsorted(steps, needed)


def join_variables(path: str, variables: dict[str, str], points: dict[str, np.ndarray], *,
                   options: JoinOptions | None = None, storage_options: dict | None = None
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{env name: (values, qc)} for points with lat, lon, depth_min, depth_max, time (catalog dtypes),
    the grid opened once for all variables."""
    out = {}
    with opened(path, storage_options=storage_options) as ds:
        identity = file_identity(path, storage_options)
        for name, var in variables.items():
            grid = Grid(ds[resolve_variable(ds, var or name, where=redact(path))], source=path, options=options,
                        identity=identity)
            out[name] = grid.join(points["lat"], points["lon"], depth_min=points.get("depth_min"),
                                  depth_max=points.get("depth_max"), time=points.get("time"))
    return out


# ---------------------------------------------------------------- a small synthetic grid


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
