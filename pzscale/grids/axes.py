"""Grid axes and the nearest-lookup kernels behind ``Grid.join``.

- ``TimeAxis`` decodes a CF time coordinate with cftime (any calendar) and carries catalog times
  (int64 ms since 1970 UTC) over to it; ``months_of`` and ``as_time_ms`` convert catalog times.
- ``Axis`` and ``LonAxis`` find the nearest cell of a regular grid: index arithmetic on regular
  1-D axes (``regular_step``, ``nearest_sorted``), ``np.searchsorted`` on irregular ones,
  longitudes compared on the circle (0..360 and -180..180 grids, the seam, boxes straddling 0).
- ``CellTree`` finds the nearest cell of a curvilinear grid (2-D latitude/longitude): a KD-tree
  over the cell centres on the unit sphere, and each cell's diagonal for the grid's footprint.
- ``unit_vectors`` and ``chord_of_km`` put points on the unit sphere for those KD-trees (the
  curvilinear lookup and the land fill).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import cftime
import numpy as np
import xarray as xr
from scipy.spatial import cKDTree

from pzscale.errors import InputError, one_line
from pzscale.schema import TIME_FILL

EARTH_RADIUS_KM = 6371.0088
MS_PER_DAY = 86_400_000
_TIME_UNIT_DAYS = {"day": 1.0, "hour": 1 / 24, "minute": 1 / 1440, "second": 1 / 86400, "millisecond": 1 / 86_400_000,
                   "microsecond": 1 / 86_400_000_000, "week": 7.0}


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


def unit_vectors(lat: np.ndarray, lon: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """(n, 3) points on the unit sphere, for chord-distance KD-trees (chord distance orders points
    as great-circle distance does)."""
    phi, lam = np.radians(np.ravel(lat)), np.radians(np.ravel(lon))
    out = np.empty((len(phi), 3), dtype)
    cos_phi = np.cos(phi)
    out[:, 0], out[:, 1], out[:, 2] = cos_phi * np.cos(lam), cos_phi * np.sin(lam), np.sin(phi)
    return out


def chord_of_km(km: float) -> float:
    return 2.0 * math.sin(min(km / EARTH_RADIUS_KM, math.pi) / 2.0)


def km_of_chord(chord: np.ndarray) -> np.ndarray:
    return 2.0 * EARTH_RADIUS_KM * np.arcsin(np.minimum(np.asarray(chord, np.float64) / 2.0, 1.0))


@dataclass(frozen=True)
class CellTree:
    """The nearest cell centre of a curvilinear grid on the sphere, and whether a point is on the grid.

    ``tree`` holds the unit vectors of the cells with a position: not NaN (masked coordinates), not
    beyond the poles, and not at (0, 0) when several cells are (a masked halo some NEMO outputs
    write as zeros; a real grid has at most one centre there). A point is on the grid when it is
    within ``reach`` of its nearest centre: that cell's diagonal, i.e. about one cell beyond the
    grid's edge, as a regular grid's one-step tolerance allows.

    Memory, for a 1/12 degree global grid (4500 x 3000 = 13.5M cells): the tree keeps its points in
    float64 whatever it is given (float32 input would be copied to float64: more memory, not less),
    324 MB, plus 108 MB of its own indices and its nodes; ``reach`` is float32 (54 MB) and ``cell``
    int32 (54 MB, only when some cells have no position). Points are built a block of rows at a time
    from the file's own dtype. Measured: about 10 s to build, 0.8 GB above the coordinates at the
    peak, 0.5 GB of arrays kept, 100k points looked up in 0.4 s. It is built once per grid file and
    worker process (``Grid`` caches it): a tree over the window a shard needs would be rebuilt for
    every shard, and shards whose images span the globe need the whole grid anyway.
    """

    shape: tuple[int, int]
    tree: cKDTree
    cell: np.ndarray | None  # flat (row-major) cell of each tree point; None when every cell is in the tree
    reach: np.ndarray  # chord, per tree point

    @classmethod
    def of(cls, lat: np.ndarray, lon: np.ndarray, rows: int = 256) -> CellTree:
        lat, lon = np.asarray(lat), np.asarray(lon)  # the file's dtype: float64 copies only a block at a time
        with np.errstate(invalid="ignore"):
            valid = np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90.0)
        zeros = valid & (lat == 0.0) & (lon == 0.0)
        if np.count_nonzero(zeros) > 1:
            valid &= ~zeros
        count = int(np.count_nonzero(valid))
        if not count:
            raise ValueError("no cell has a finite latitude and longitude")
        reach = _cell_diagonals(lat, lon, valid, rows)
        points = np.empty((count, 3))  # row-major order of the cells, as np.flatnonzero(valid)
        done = 0
        for start in range(0, lat.shape[0], rows):
            keep = valid[start : start + rows]
            block = unit_vectors(lat[start : start + rows][keep].astype(np.float64),
                                 lon[start : start + rows][keep].astype(np.float64))
            points[done : done + len(block)] = block
            done += len(block)
        # unbalanced, non-compact nodes build several times faster on millions of points (SciPy's advice)
        tree = cKDTree(points, leafsize=16, balanced_tree=False, compact_nodes=False, copy_data=False)
        if count == valid.size:
            return cls(lat.shape, tree, None, reach.ravel())
        cell = np.flatnonzero(valid).astype(np.int32 if valid.size < 2**31 else np.int64)
        return cls(lat.shape, tree, cell, reach[valid])

    def nearest(self, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For finite points: the flat index of the nearest cell, the chord to it, and its reach."""
        dist, k = self.tree.query(unit_vectors(lat, lon))
        cell = k if self.cell is None else self.cell[k].astype(np.int64)
        return cell, dist, self.reach[k]

    def centres(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Latitude and longitude (-180..180) of cells by flat index (cells in the tree only)."""
        k = flat if self.cell is None else np.searchsorted(self.cell, flat)
        xyz = self.tree.data[k]
        return np.degrees(np.arcsin(np.clip(xyz[:, 2], -1, 1))), np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0]))

    def within(self, lat: np.ndarray, lon: np.ndarray, chord: float | np.ndarray) -> np.ndarray:
        """Flat indices of every cell within ``chord`` of any of the points (exact, from the tree)."""
        if not len(lat):
            return np.zeros(0, np.int64)
        found = self.tree.query_ball_point(unit_vectors(lat, lon), chord, return_sorted=False)
        k = np.unique(np.fromiter((i for hits in found for i in hits), np.int64))
        return k if self.cell is None else self.cell[k].astype(np.int64)


def _cell_diagonals(lat: np.ndarray, lon: np.ndarray, valid: np.ndarray, rows: int = 256) -> np.ndarray:
    """Each cell's diagonal as a chord (float32): the larger spacing to its neighbours along each
    dimension, combined; along a dimension of one cell the other spacing stands in (square cells),
    and a cell with no neighbour at all reaches everywhere. Computed a block of rows at a time, in
    float32 (spacings to 1e-4 or better), so that a 13.5M-cell grid needs tens of MB beside it."""
    ny, nx = lat.shape
    out = np.empty((ny, nx), np.float32)
    for start in range(0, ny, rows):
        lo, hi = max(start - 1, 0), min(start + rows + 1, ny)  # a row of overlap each side
        phi = np.radians(np.where(valid[lo:hi], lat[lo:hi], np.nan)).astype(np.float32)
        lam = np.radians(lon[lo:hi]).astype(np.float32)
        xyz = (np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi))  # NaN where no position
        spacing = []
        for axis in (0, 1):
            step = np.sqrt(sum(np.diff(c, axis=axis) ** 2 for c in xyz))  # NaN beside a cell without position
            pad = [(0, 0), (0, 0)]
            pad[axis] = (1, 0)
            before = np.pad(step, pad, constant_values=np.nan)
            pad[axis] = (0, 1)
            after = np.pad(step, pad, constant_values=np.nan)
            spacing.append(np.fmax(before, after))  # fmax: NaN only when both sides are
        along_y, along_x = spacing
        along_y, along_x = np.where(np.isnan(along_y), along_x, along_y), np.where(np.isnan(along_x), along_y, along_x)
        block = np.nan_to_num(np.hypot(along_y, along_x), nan=np.inf)
        out[start : start + rows] = block[start - lo : start - lo + min(rows, ny - start)]
    return out


# ---------------------------------------------------------------- the join
