"""The environmental join: ``Grid.join``, the vectorised nearest-cell lookup of points in one variable.

On a regular grid the nearest latitude and longitude, each within its tolerance; on a curvilinear
grid (2-D latitude/longitude) the nearest cell centre on the sphere (``CellTree``, built once per
grid file and worker process, ``_TREES``), a point farther than that cell's diagonal being off the
grid. Depth as the nearest level or the mean over a depth range, time as the nearest step or the
month of year, land (NaN) cells optionally replaced by the nearest valid cell within a radius
(``scipy.spatial.cKDTree`` on the unit sphere, on either kind of grid). Only the box of the grid the
points need is read, a few time steps at a time, so memory stays bounded; a worker process keeps
recently read boxes (``_BOXES``, ``PZSCALE_GRID_CACHE_BYTES``, default 512 MiB) keyed by the grid
file's identity (``file_identity``), so shards whose points span the globe do not each decompress
the whole grid again, and the grid files it opened (``_OPENED``, at most ``PZSCALE_GRID_OPEN_FILES``,
default 4, with each variable's ``Grid``), so shards do not each open the file and read its axes
again; a rewritten file (another identity) is opened afresh. ``join_variables`` joins several
variables of one file.

Every point gets a QC flag (``QC_VALUES``): ok, out_of_range (outside a tolerance, or off a
curvilinear grid's footprint), land_filled, no_data (the cell is NaN and no fill was asked or
found), no_position (lat/lon, or the time or depth the grid needs, unknown).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import xarray as xr
from scipy.spatial import cKDTree

from pzscale.errors import InputError
from pzscale.grids.axes import Axis, CellTree, LonAxis, TimeAxis, as_time_ms, chord_of_km, months_of, unit_vectors
from pzscale.grids.naming import (
    KELVIN_UNITS,
    find_axes,
    open_grid_to_keep,
    opened,
    redact,
    resolve_variable,
    vertical_metres,
)
from pzscale.schema import TIME_FILL

QC_OK, QC_OUT_OF_RANGE, QC_LAND_FILLED, QC_NO_DATA, QC_NO_POSITION = range(5)
QC_VALUES = ("ok", "out_of_range", "land_filled", "no_data", "no_position")
QC_NAMES = np.asarray(QC_VALUES, dtype=object)  # QC code -> its string: ``QC_NAMES[codes]``
QC_NAMES.setflags(write=False)
# In the catalog a QC array is a CF flag variable of these int8 codes; the fill (-1) is a row not joined yet.
QC_NOT_JOINED = -1
QC_FLAG_VALUES = (QC_NOT_JOINED, *range(len(QC_VALUES)))
QC_FLAG_MEANINGS = " ".join(("not_joined", *QC_VALUES))


def qc_names(codes: np.ndarray) -> np.ndarray:
    """The QC strings of stored int8 codes (``""`` for a row not joined yet), e.g. of ``ds["env_sst_qc"]``."""
    codes = np.asarray(codes)
    if codes.dtype.kind not in "iu":
        raise ValueError(f"QC codes must be integers, not {codes.dtype}")
    if codes.size and (codes.min() < QC_NOT_JOINED or codes.max() >= len(QC_VALUES)):
        raise ValueError(f"QC codes must be between {QC_NOT_JOINED} and {len(QC_VALUES) - 1}")
    return np.asarray(("", *QC_VALUES), dtype=object)[codes.astype(np.int64) + 1]


def qc_codes(names: np.ndarray) -> np.ndarray:
    """The int8 codes of QC strings (``""`` -> not joined): what layout 1 stored, as layout 2 stores it."""
    names = np.asarray(names).astype(object)  # zarr hands strings back as StringDType, which will not cast to str
    names = np.where(names == None, "", names)  # noqa: E711 (elementwise: a missing string is a row not joined)
    table = {"": QC_NOT_JOINED, **{name: code for code, name in enumerate(QC_VALUES)}}
    unknown = set(np.unique(names)) - set(table)
    if unknown:
        raise ValueError(f"unknown QC values {sorted(unknown)}: expected {list(table)}")
    out = np.full(names.shape, QC_NOT_JOINED, np.int8)
    for name, code in table.items():
        out[names == name] = code
    return out


@dataclass(frozen=True)
class JoinOptions:
    """How points meet cells. ``None`` tolerances default to one grid step (lat, lon, time) or
    the largest spacing between depth levels; ``land_fill_km`` switches the land fill on.

    On a curvilinear grid a point is on the grid within its nearest cell's diagonal of that cell's
    centre; a lat or lon tolerance given replaces that rule by the difference in latitude or
    longitude between the point and the centre."""

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

    index: dict[str, np.ndarray]  # time, depth, and y, x: the lat and lon index on a regular grid
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
        self._where = where
        found = find_axes(da, where=where)
        axes = dict(found.dims)
        drop = {d: 0 for d in map(str, da.dims) if d not in axes.values()}  # length-1 extras (zlev, ...)
        self.time: TimeAxis | None = None
        self.time_mode = "none"
        if "time" in axes:
            coord = da.coords[found.coords["time"]] if "time" in found.coords else None
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
        self.curvilinear = found.curvilinear
        horizontal = ("y", "x") if self.curvilinear else ("lat", "lon")
        self.da = da.isel(drop).transpose(*[axes[a] for a in ("time", "depth", *horizontal) if a in axes])
        self.axes = axes
        self.coords = found.coords  # axis -> the coordinate holding its values
        self.name = str(da.name)
        self.lat: Axis | None = None
        self.lon: LonAxis | None = None
        self._tree: CellTree | None = None  # built at the first lookup (``describe`` needs none)
        if not self.curvilinear:
            self.lat = Axis.of(axes["lat"], da.coords[found.coords["lat"]].values)
            self.lon = LonAxis.of(axes["lon"], da.coords[found.coords["lon"]].values)
        self.depth: Axis | None = None
        if "depth" in axes:
            if "depth" not in found.coords:
                raise InputError(f"{where}: depth dimension {axes['depth']!r} has no coordinate")
            coord = da.coords[found.coords["depth"]]
            levels = np.asarray(coord.values, dtype=np.float64) * vertical_metres(coord, where=where)
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
        if self.curvilinear:
            given = {"lat": o.lat_tolerance, "lon": o.lon_tolerance}
            tol = {k: v for k, v in given.items() if v is not None} or {"cell_diagonals": 1.0}
        else:
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
        method = ("nearest cell centre on the sphere (curvilinear grid), within the cell's diagonal"
                  if self.curvilinear else "nearest cell (longitude on the circle)")
        return {"grid": self.source, "variable": self.name, "units": self.units, "source_units": self.source_units,
                "standard_name": str(self.da.attrs.get("standard_name", "")),
                "long_name": str(self.da.attrs.get("long_name", "")),
                "method": method, "depth_method": depth, "time_method": time,
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
        if self.curvilinear:
            index["y"], index["x"], ok = self._nearest_cells(lat, lon)
        else:
            index["y"], ok = self.lat.nearest(lat, tol["lat"])
            index["x"], ok_lon = self.lon.nearest(lon, tol["lon"])
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

    def cell_tree(self) -> CellTree:
        """The curvilinear grid's KD-tree: this process's copy for the same file, else built now.

        A grid with an identity leaves it in ``_TREES`` and keeps no reference of its own: grids
        kept by ``_OPENED`` must not keep more trees alive than ``_TREES`` holds."""
        names = (self.coords["lat"], self.coords["lon"])
        if self._cache_key is not None:
            return _TREES.get_or_build((*self._cache_key, *names), lambda: self._build_tree(*names))
        if self._tree is None:
            self._tree = self._build_tree(*names)
        return self._tree

    def _build_tree(self, lat_name: str, lon_name: str) -> CellTree:
        try:
            return CellTree.of(self.da.coords[lat_name].values, self.da.coords[lon_name].values)
        except ValueError as e:
            raise InputError(f"{self._where}: {e}") from None

    def _nearest_cells(self, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row, column and whether on the grid, for each point (NaN or beyond a pole: row 0, off)."""
        n = len(lat)
        rows, cols, ok = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, bool)
        on = np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90.0)
        if not on.any():
            return rows, cols, ok
        tree = self.cell_tree()
        flat, chord, reach = tree.nearest(lat[on], lon[on])
        o = self.options
        if o.lat_tolerance is None and o.lon_tolerance is None:
            good = chord <= reach
        else:
            centre_lat, centre_lon = tree.centres(flat)
            good = np.ones(len(flat), bool)
            if o.lat_tolerance is not None:
                good &= np.abs(lat[on] - centre_lat) <= o.lat_tolerance
            if o.lon_tolerance is not None:
                good &= np.abs((lon[on] - centre_lon + 180.0) % 360.0 - 180.0) <= o.lon_tolerance
        rows[on], cols[on] = np.divmod(flat, tree.shape[1])
        ok[on] = good
        return rows, cols, ok

    def join(self, lat: Any, lon: Any, *, depth_min: Any = None, depth_max: Any = None,
             time: Any = None, codes: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Values (float32, NaN unless ok or land_filled) and QC strings at each point (with
        ``codes``, int8 positions in ``QC_VALUES`` instead: cheaper to count and to map).

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
        return values.astype(np.float32), found.qc if codes else QC_NAMES[found.qc]

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
        select: dict[str, Any] = {}
        local: dict[str, np.ndarray] = {}
        if self.curvilinear:  # the rows and columns the points need; a fill reads a wider one (_curvilinear_fill_box)
            select[self.axes["y"]], local["y"] = _span(idx["y"])
            select[self.axes["x"]], local["x"] = _span(idx["x"])
        else:
            margin_lat = margin_lon = 0
            if fill_km:
                margin_lat = math.ceil(fill_km / (111.2 * self.lat.step)) + 1
                coslat = max(math.cos(math.radians(min(89.0, float(np.abs(lat).max())))), 0.02)
                margin_lon = math.ceil(fill_km / (111.2 * self.lon.step * coslat)) + 1
            select[self.axes["lat"]], local["y"] = self._window(self.lat, idx["y"], margin_lat)
            select[self.axes["lon"]], local["x"] = self._window(self.lon, idx["x"], margin_lon)
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
        block = self._block(select)  # native dtype: only the gathered values become float64
        time_pos = local.get("time", np.zeros(len(batch), np.int64))
        level_key = np.zeros(len(batch), np.int64)
        values: np.ndarray
        if k_range is not None:
            # mean over a range of levels per point: cumulative sums along depth, NaN levels skipped
            finite = np.isfinite(block)
            sums = np.concatenate([np.zeros(block[:, :1].shape), np.cumsum(np.where(finite, block, 0.0), 1,
                                                                            dtype=np.float64)], 1)
            counts = np.concatenate([np.zeros(block[:, :1].shape, np.int64), np.cumsum(finite, 1)], 1)
            a, b = k_range[0], k_range[1] + 1
            y, x = local["y"], local["x"]
            total = sums[time_pos, b, y, x] - sums[time_pos, a, y, x]
            count = counts[time_pos, b, y, x] - counts[time_pos, a, y, x]
            with np.errstate(invalid="ignore", divide="ignore"):
                values = np.where(count > 0, total / np.maximum(count, 1), np.nan)
            level_key = a * (block.shape[1] + 1) + b
        else:
            depth_pos = local.get("depth", np.zeros(len(batch), np.int64))
            values = block[time_pos, depth_pos, local["y"], local["x"]].astype(np.float64)
            if self.depth is not None:
                level_key = depth_pos
        qc = np.full(len(batch), QC_OK, np.int8)
        missing = np.isnan(values)
        qc[missing] = QC_NO_DATA
        if fill_km and missing.any():
            if self.curvilinear:
                block, cells = self._curvilinear_fill_box(select, idx["y"][missing], idx["x"][missing],
                                                          lat[missing], lon[missing], fill_km)
            else:
                lat_box = self.da.coords[self.coords["lat"]].values[select[self.axes["lat"]]]
                lon_box = self.da.coords[self.coords["lon"]].values[select[self.axes["lon"]]]
                grid_lat, grid_lon = np.meshgrid(np.asarray(lat_box, np.float64), np.asarray(lon_box, np.float64),
                                                 indexing="ij")
                cells = unit_vectors(grid_lat, grid_lon)
            self._fill_from_nearest_valid(block, values, qc, missing, time_pos, level_key, k_range, lat, lon, cells,
                                          fill_km)
        return values, qc

    def _block(self, select: dict[str, Any]) -> np.ndarray:
        """The box read, always 4-D: (time, depth, lat or y, lon or x)."""
        block = self._read(select)
        if self.time is None:
            block = block[np.newaxis]
        if self.depth is None:
            block = block[:, np.newaxis]
        return block

    def _curvilinear_fill_box(self, select: dict[str, Any], rows: np.ndarray, cols: np.ndarray, lat: np.ndarray,
                              lon: np.ndarray, km: float) -> tuple[np.ndarray, np.ndarray]:
        """The box holding every cell within ``km`` of the points to fill, found by the grid's tree
        (cells near in space may be far apart in index across a seam or a fold: the box then spans
        the grid), and the unit vectors of its cells."""
        tree = self.cell_tree()
        # one query per nearest cell, its radius widened by the farthest of its points from its centre
        flat, inverse = np.unique(rows * tree.shape[1] + cols, return_inverse=True)
        centre_lat, centre_lon = tree.centres(flat)
        offset = np.linalg.norm(unit_vectors(lat, lon) - unit_vectors(centre_lat, centre_lon)[inverse], axis=1)
        radius = np.zeros(len(flat))
        np.maximum.at(radius, inverse, offset)
        near_rows, near_cols = np.divmod(tree.within(centre_lat, centre_lon, chord_of_km(km) + radius), tree.shape[1])
        wide = dict(select)
        for dim, near in ((self.axes["y"], near_rows), (self.axes["x"], near_cols)):
            read = select[dim]
            if len(near):
                read = slice(min(read.start, int(near.min())), max(read.stop, int(near.max()) + 1))
            wide[dim] = read
        box = {self.axes["y"]: wide[self.axes["y"]], self.axes["x"]: wide[self.axes["x"]]}
        lat_box = np.asarray(self.da.coords[self.coords["lat"]].isel(box).values, np.float64)
        lon_box = np.asarray(self.da.coords[self.coords["lon"]].isel(box).values, np.float64)
        return self._block(wide), unit_vectors(lat_box, lon_box)

    def _fill_from_nearest_valid(self, block: np.ndarray, values: np.ndarray, qc: np.ndarray, missing: np.ndarray,
                                 time_pos: np.ndarray, level_key: np.ndarray, k_range: Any, lat: np.ndarray,
                                 lon: np.ndarray, cells: np.ndarray, km: float) -> None:
        """Replace NaN cells by the nearest finite cell of the same time/level within ``km`` (in place);
        ``cells`` are the unit vectors of the box's cells, row-major (NaN: a cell without a position)."""
        placed = np.isfinite(cells).all(axis=1)
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
            valid = np.flatnonzero(np.isfinite(flat) & placed)
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


class _TreeCache:
    """Curvilinear grids' KD-trees built by this process, by grid file and coordinates: every env task
    on the same grid would otherwise rebuild it (seconds and ~0.5 GB for a 1/12 degree global grid)."""

    def __init__(self, keep: int):
        self.keep = keep
        self.trees: OrderedDict[tuple, CellTree] = OrderedDict()
        self.lock = threading.Lock()  # held while building: threads of a worker wait for one tree, not build two

    def get_or_build(self, key: tuple | None, build: Any) -> CellTree:
        if key is None:
            return build()
        with self.lock:
            tree = self.trees.get(key)
            if tree is None:
                tree = self.trees[key] = build()
                while len(self.trees) > self.keep:
                    self.trees.popitem(last=False)
            self.trees.move_to_end(key)
            return tree


_TREES = _TreeCache(2)


@dataclass
class _OpenedGrid:
    """One grid file opened by this process, the ``Grid`` of each variable and options made from it,
    and how many tasks use it now (a file that leaves the cache while in use is closed by its last user)."""

    ds: xr.Dataset
    identity: tuple
    release: Callable[[], None]  # closes the file until the next read (no handle or lock held between tasks)
    users: int = 0
    retired: bool = False
    grids: dict[tuple, Grid] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def grid(self, path: str, variable: str, options: JoinOptions) -> Grid:
        """The variable's ``Grid`` (axes read once per file and process), made now if new."""
        key = (variable, options)
        with self.lock:
            grid = self.grids.get(key)
        if grid is None:
            name = resolve_variable(self.ds, variable, where=redact(path))
            made = Grid(self.ds[name], source=path, options=options, identity=self.identity)
            with self.lock:
                grid = self.grids.setdefault(key, made)
                while len(self.grids) > _GRIDS_PER_FILE:  # a stage joins a few variables: never grows unbounded
                    self.grids.pop(next(iter(self.grids)))
        return grid


_GRIDS_PER_FILE = 16


class _OpenedGrids:
    """Grid files opened by this process, kept open for the next task: the shards of an env stage on one
    worker open the file (and read its coordinates and axes) once instead of once per shard.

    An entry is named by the path, its storage options and the file's ``file_identity`` (size and
    modification time, ETag): a rewritten file is opened afresh, its old entry closed. Between tasks a
    NetCDF file is closed (``open_grid_to_keep``; xarray reopens it at the next read, a few ms), so no
    handle or HDF5 lock stops anyone rewriting it; the dataset, its coordinates and grids stay.

    Memory: at most ``keep`` files (``PZSCALE_GRID_OPEN_FILES``, default 4) are kept, least recently
    used dropped first, each with its lazily opened dataset (index coordinates) and at most 16 ``Grid``
    (one per variable and options: its axes, kilobytes on a regular grid). Values are never held here:
    boxes read are ``_BOXES``'s (its own byte budget) and curvilinear trees ``_TREES``'s (two).
    ``opens`` counts the files this process opened (for tests)."""

    def __init__(self, keep: int):
        self.keep = keep
        self.entries: OrderedDict[tuple, _OpenedGrid] = OrderedDict()
        self.lock = threading.Lock()  # a worker may run several tasks in threads
        self.opens = 0

    @contextmanager
    def use(self, path: str, storage_options: dict | None = None) -> Iterator[_OpenedGrid]:
        """``with _OPENED.use(path, so) as entry:`` the file open (from the cache when unchanged)."""
        path = str(path)
        identity = file_identity(path, storage_options)
        key = (path, json.dumps(storage_options or {}, sort_keys=True, default=str))
        entry = self._take(key, identity)
        if entry is None:
            ds, release = open_grid_to_keep(path, storage_options=storage_options)
            entry = self._add(key, _OpenedGrid(ds, identity, release))
        try:
            yield entry
        finally:
            with self.lock:
                entry.users -= 1
                if entry.users == 0:  # a NetCDF file is closed between tasks: reopening it costs a few ms
                    entry.release()
                    if entry.retired:
                        entry.ds.close()

    def _take(self, key: tuple, identity: tuple) -> _OpenedGrid | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                return None
            if entry.identity != identity:  # the file changed since it was opened
                self._retire(self.entries.pop(key))
                return None
            self.entries.move_to_end(key)
            entry.users += 1
            return entry

    def _add(self, key: tuple, entry: _OpenedGrid) -> _OpenedGrid:
        with self.lock:
            self.opens += 1
            present = self.entries.get(key)
            if present is not None and present.identity == entry.identity:  # another thread opened it first
                self._retire(entry)
                entry = present
            else:
                if present is not None:
                    self._retire(present)
                self.entries[key] = entry
            self.entries.move_to_end(key)
            entry.users += 1
            while len(self.entries) > self.keep:
                self._retire(self.entries.popitem(last=False)[1])
            return entry

    def _retire(self, entry: _OpenedGrid) -> None:
        """Close the file now, or when its last user is done (called under the lock)."""
        entry.retired = True
        if entry.users == 0:
            entry.release()
            entry.ds.close()

    def clear(self) -> None:
        """Close every file (those in use when their tasks are done)."""
        with self.lock:
            while self.entries:
                self._retire(self.entries.popitem()[1])


_OPENED = _OpenedGrids(int(os.environ.get("PZSCALE_GRID_OPEN_FILES", 4)))


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


def _span(needed: np.ndarray) -> tuple[slice, np.ndarray]:
    """The slice from the first to the last needed index, and each needed index's position in it."""
    start = int(needed.min())
    return slice(start, int(needed.max()) + 1), needed - start


def _steps(needed: np.ndarray) -> tuple[Any, np.ndarray]:
    """What to read along time or depth, and each needed step's position in it: a slice when the
    steps are dense enough (one hyperslab read beats a list of indices in netCDF/HDF5)."""
    steps = np.unique(needed)
    first, last = int(steps[0]), int(steps[-1])
    if last - first + 1 <= 2 * len(steps) + 2:
        return slice(first, last + 1), needed - first
    return steps, np.searchsorted(steps, needed)


def join_variables(path: str, variables: dict[str, str], points: dict[str, np.ndarray], *,
                   options: JoinOptions | None = None, storage_options: dict | None = None,
                   codes: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{env name: (values, qc)} for points with lat, lon, depth_min, depth_max, time (catalog dtypes),
    the grid opened once for all variables, and kept open by this process for the next call on the
    same unchanged file (``_OPENED``). ``codes``: QC as int8 positions in ``QC_VALUES``, not strings."""
    options = options or JoinOptions()
    out = {}
    with _OPENED.use(path, storage_options) as entry:
        for name, var in variables.items():
            grid = entry.grid(str(path), var or name, options)
            out[name] = grid.join(points["lat"], points["lon"], depth_min=points.get("depth_min"),
                                  depth_max=points.get("depth_max"), time=points.get("time"), codes=codes)
    return out
