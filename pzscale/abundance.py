"""Taxon abundance on a grid: image counts per taxon, time bin and lat/lon cell, and a map.

Two passes of one read task per shard (``stage.map_shards``: storage faults retried per shard):
the first finds the taxa, the extent and the sampled volumes, the second counts the images of
each (taxon, time bin, cell) that occurs, a small table per shard summed on the client, so a
worker's memory does not grow with the grid. The bins are left-closed (``cell_deg`` degrees, a
pandas frequency such as ``"1MS"`` for time); volumes per cell are a flox groupby-sum.
Images count when their status is ok, they have a taxon at the rank (the catalog's own
annotation, or a model's prediction at least ``min_prob`` probable), a position and a time.

Where the sampled volume is known (IFCB: ``volume_analysed`` mL per sample) concentrations
are given too: images of samples with a volume are counted apart, and the volume of a cell is
the sum over its distinct samples (a sample = the same source, time, position, depths and
volume), so that 500 images of one bin add its volume once.

Output Dataset, dims (taxon, time, lat, lon); ``time`` is the start of each bin, lat/lon the
cell centres (lon in -180..180), covering the extent of the data only:

- ``count`` int64: images;
- ``count_volumetric`` int64: images of samples with a known volume;
- ``volume_ml`` float64 (time, lat, lon): volume imaged in the cell (0 when none known);
- ``concentration`` float32: ``count_volumetric`` per litre (NaN where no volume).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import flox.xarray
import fsspec
import numpy as np
import pandas as pd
import xarray as xr
from distributed import Client

from pzscale import grids
from pzscale.errors import CatalogError, InputError
from pzscale.schema import RANKS, STATUS_OK, TIME_FILL, predicting_models, prediction_name
from pzscale.stage import Catalog, map_shards

TAXON_RANKS = (*RANKS, "lineage")


def taxon_names(values: np.ndarray, words: int) -> np.ndarray:
    """The last ``words`` words of lineage prefixes ('' when shorter): a model's per-rank
    predictions are lineage prefixes; the name at species is 'genus epithet'."""
    text = pd.Series(np.asarray(values, dtype=object)).fillna("")
    parts = text.str.split()
    last = parts.str[-words:].str.join(" ")
    return np.where(parts.str.len() >= words, last, "").astype(object)


def model_ids(ds: xr.Dataset) -> list[str]:
    return predicting_models({str(v) for v in ds.data_vars})


def taxon_column(ds: xr.Dataset, rank: str, *, model: str | None = None, min_prob: float = 0.0,
                 where: str = "catalog") -> xr.DataArray:
    """The taxon of each image at ``rank`` ('' when none or not confident enough), lazily.

    Own taxonomy: the rank's column (species as 'genus epithet'), ``lineage`` the whole lineage.
    A model: ``pred__<model>__<rank>`` reduced to the rank's name, kept where
    ``pred__<model>__<rank>_prob >= min_prob`` (``lineage``: the predicted label and its probability).
    """
    if rank not in TAXON_RANKS:
        raise InputError(f"rank must be one of {list(TAXON_RANKS)}, not {rank!r}")
    ok = ds["status"] == STATUS_OK
    if model is None:
        binomial = rank == "species"
        taxon = xr.where(ds["species"] != "", ds["genus"] + " " + ds["species"], "") if binomial else ds[rank]
        return xr.where(ok, taxon, "").astype(object)
    label, prob = _taxon_arrays(rank, model)
    if label not in ds or prob not in ds:
        raise CatalogError(f"{where}: no predictions {label}/{prob}; models with predictions here: {model_ids(ds)}")
    if rank == "lineage":
        taxon = ds[label]
    else:
        words = 2 if rank == "species" else 1
        depth = RANKS.index(rank) + 1
        full = xr.apply_ufunc(taxon_names, ds[label], kwargs={"words": depth}, dask="parallelized",
                              output_dtypes=[object])
        taxon = xr.where(full != "", xr.apply_ufunc(taxon_names, ds[label], kwargs={"words": words},
                                                    dask="parallelized", output_dtypes=[object]), "")
    return xr.where(ok & (ds[prob] >= min_prob), taxon, "").astype(object)


def _edges(lo: float, hi: float, step: float, low: float, high: float) -> np.ndarray:
    first = max(low, math.floor(lo / step) * step)
    last = min(high, (math.floor(hi / step) + 1) * step)
    return np.arange(first, last + step / 2, step)


def _offset(time_bin: str) -> pd.DateOffset:
    try:
        return pd.tseries.frequencies.to_offset(time_bin)
    except ValueError as e:
        raise InputError(f"time bin {time_bin!r} is not a pandas frequency (1MS, 7D, 1YS ...): {e}") from None


def _time_edges(t0_ms: float, t1_ms: float, time_bin: str) -> pd.DatetimeIndex:
    offset = _offset(time_bin)
    first = offset.rollback(pd.Timestamp(int(t0_ms), unit="ms").normalize())
    last = pd.Timestamp(int(t1_ms), unit="ms")
    edges = pd.date_range(first, last + offset, freq=offset)
    if edges[-1] <= last:
        edges = edges.append(pd.DatetimeIndex([edges[-1] + offset]))
    return edges


POINT_COLUMNS = ("status", "lat", "lon", "time", "volume_analysed", "source", "depth_min", "depth_max")


def _taxon_arrays(rank: str, model: str | None) -> list[str]:
    """The arrays ``taxon_column`` reads for a rank, from the annotations or a model's predictions."""
    if model is not None:
        keys = ("label", "prob") if rank == "lineage" else (rank, f"{rank}_prob")
        return [prediction_name(model, key) for key in keys]
    return ["genus", "species"] if rank == "species" else [rank]


def _points(cat: Catalog, start: int, stop: int, rank: str, model: str | None, min_prob: float,
            present: list[str]) -> pd.DataFrame:
    """A shard's images as rows (taxon, time in ms, lat, lon in -180..180, volume ...); taxon '' when not counted."""
    missing = [n for n in _taxon_arrays(rank, model) if n not in present]
    if model is not None and missing:
        raise CatalogError(f"{cat.url}: no predictions {'/'.join(_taxon_arrays(rank, model))}; models with "
                           f"predictions here: {predicting_models(present)}")
    names = [*POINT_COLUMNS, *(n for n in _taxon_arrays(rank, model) if n in present)]
    ds = xr.Dataset({name: ("image", values) for name, values in cat.read(start, stop, names).items()})
    frame = pd.DataFrame({name: ds[name].values for name in POINT_COLUMNS})
    frame["taxon"] = taxon_column(ds, rank, model=model, min_prob=min_prob, where=cat.url).values
    frame["lon"] = (frame["lon"] + 180.0) % 360.0 - 180.0
    counted = (frame["taxon"] != "") & frame["lat"].notna() & frame["lon"].notna() & (frame["time"] != TIME_FILL)
    frame.loc[~counted, "taxon"] = ""
    return frame


def _scan_shard(cat: Catalog, start: int, stop: int, *args: Any) -> tuple[set, list[float] | None, pd.DataFrame]:
    """Pass 1 over a shard: its taxa, the extent (lat, lon, time min then max) of its counted images, and
    its distinct samples with a known volume (IFCB bins: one row per bin)."""
    frame = _points(cat, start, stop, *args)
    counted = frame[frame["taxon"] != ""]
    extent = None if counted.empty else [float(counted[c].min()) for c in ("lat", "lon", "time")] + \
        [float(counted[c].max()) for c in ("lat", "lon", "time")]
    keep = (frame["volume_analysed"] > 0) & (frame["status"] == STATUS_OK) & frame["lat"].notna() & \
        frame["lon"].notna() & (frame["time"] != TIME_FILL)
    samples = frame.loc[keep, ["source", "time", "lat", "lon", "depth_min", "depth_max", "volume_analysed"]]
    return set(counted["taxon"].unique()), extent, samples.drop_duplicates()


def _count_shard(cat: Catalog, start: int, stop: int, rank: str, model: str | None, min_prob: float,
                 present: list[str], taxa: np.ndarray, edges: tuple[np.ndarray, ...]) -> pd.DataFrame:
    """Pass 2 over a shard: counts per (taxon, time bin, lat cell, lon cell) that occur, as a small table."""
    frame = _points(cat, start, stop, rank, model, min_prob, present)
    frame = frame[frame["taxon"] != ""]
    lat = np.minimum(frame["lat"].to_numpy(np.float64), edges[1][-1] - 1e-9)  # lat 90 in the last cell
    cells = pd.DataFrame({
        "taxon": np.searchsorted(taxa, frame["taxon"].to_numpy(object)),
        # left-closed bins, as pandas intervals: edge[i] <= x < edge[i + 1]
        "time": np.searchsorted(edges[0], frame["time"].to_numpy(np.float64), side="right") - 1,
        "lat": np.searchsorted(edges[1], lat, side="right") - 1,
        "lon": np.searchsorted(edges[2], frame["lon"].to_numpy(np.float64), side="right") - 1,
        "count": 1, "count_volumetric": (frame["volume_analysed"] > 0).to_numpy(np.int64)})
    return cells.groupby(["taxon", "time", "lat", "lon"], as_index=False).sum()

def abundance(
    url: str,
    *,
    rank: str = "genus",
    model: str | None = None,
    min_prob: float = 0.0,
    cell_deg: float = 1.0,
    time_bin: str = "1MS",
    out: str | None = None,
    storage_options: dict | None = None,
    out_storage_options: dict | None = None,
    client: Client | None = None,
) -> xr.Dataset:
    """Counts (and concentrations where volumes are known) per taxon, time bin and cell.

    Two passes of one read task per shard (on ``client`` or the current one, else in this
    process): taxa, extent and sampled volumes, then counts per cell that occur, summed on the
    client; the result is written to Zarr at ``out`` when given.
    """
    if not cell_deg > 0:
        raise InputError(f"cell size must be > 0 degrees, not {cell_deg}")
    _offset(time_bin)  # a bad frequency fails before any pass over the catalog
    cat = Catalog.open(url, storage_options)
    present = cat.arrays()
    args = (rank, model, min_prob, present)
    _points(cat, 0, 0, *args)  # a rank or model without its arrays fails before any pass
    scans = map_shards(_scan_shard, cat, *args, client=client)
    taxa = np.array(sorted(set().union(*(taxa for taxa, _, _ in scans))), dtype=object)
    if not len(taxa):
        raise InputError(f"{url}: no image with a taxon at rank {rank!r}, a position and a time to count")
    extents = np.array([extent for _, extent, _ in scans if extent is not None])
    lat0, lon0, t0 = extents[:, :3].min(0)
    lat1, lon1, t1 = extents[:, 3:].max(0)
    lat_edges = _edges(lat0, lat1, cell_deg, -90.0, 90.0)
    lon_edges = _edges(lon0, lon1, cell_deg, -180.0, 180.0)
    time_edges = _time_edges(t0, t1, time_bin)
    time_edges_ms = time_edges.values.astype("datetime64[ms]").astype(np.int64).astype(np.float64)
    edges = (time_edges_ms, lat_edges, lon_edges)
    shape = (len(taxa), len(time_edges_ms) - 1, len(lat_edges) - 1, len(lon_edges) - 1)
    counts = {"count": np.zeros(shape, np.int64), "count_volumetric": np.zeros(shape, np.int64)}
    for part in map_shards(_count_shard, cat, *args, taxa, edges, client=client):
        at = tuple(part[axis].to_numpy() for axis in ("taxon", "time", "lat", "lon"))
        for name, total in counts.items():
            np.add.at(total, at, part[name].to_numpy())
    # a bin split over two shards: once
    samples = pd.concat([samples for _, _, samples in scans], ignore_index=True).drop_duplicates()
    bins = tuple(pd.IntervalIndex.from_breaks(e, closed="left") for e in edges)
    volume = _volume_per_cell(samples, bins, lat_edges, cell_deg)
    result = _assemble(counts, volume, taxa, time_edges, lat_edges, lon_edges)
    result.attrs = {
        "catalog": grids.redact(url), "rank": rank, "taxonomy": f"model {model}" if model else "annotations",
        "min_prob": min_prob if model else None, "cell_deg": cell_deg, "time_bin": time_bin,
        "images_counted": int(result["count"].sum()), "samples_with_volume": len(samples),
        "description": "image counts per taxon, time bin and lat/lon cell; concentration per litre where the "
                       "sampled volume is known (IFCB)",
    }
    result.attrs = {k: v for k, v in result.attrs.items() if v is not None}
    if out:
        result.to_zarr(out, mode="w", zarr_format=3, consolidated=False, storage_options=out_storage_options)
    return result


def _volume_per_cell(samples: pd.DataFrame, bins: tuple, lat_edges: np.ndarray, cell_deg: float) -> xr.DataArray:
    """Sum of distinct samples' volumes per (time, lat, lon) cell, with flox over the sample table."""
    frame = xr.Dataset(
        {"volume_ml": ("sample", samples["volume_analysed"].to_numpy(np.float64))},
        coords={"time": ("sample", samples["time"].to_numpy(np.float64)),
                "lat": ("sample", np.minimum(samples["lat"].to_numpy(np.float64), lat_edges[-1] - cell_deg / 2)),
                "lon": ("sample", (samples["lon"].to_numpy(np.float64) + 180.0) % 360.0 - 180.0)})
    if not len(samples):
        shape = tuple(len(b) for b in bins)
        return xr.DataArray(np.zeros(shape), dims=("time_bins", "lat_bins", "lon_bins"))
    return flox.xarray.xarray_reduce(frame["volume_ml"], "time", "lat", "lon", func="sum", expected_groups=bins,
                                     fill_value=0.0, engine="numpy")


def _assemble(counts: dict[str, np.ndarray], volume: xr.DataArray, taxa: np.ndarray, time_edges: pd.DatetimeIndex,
              lat_edges: np.ndarray, lon_edges: np.ndarray) -> xr.Dataset:
    dims = ("taxon", "time", "lat", "lon")
    count, count_vol = counts["count"], counts["count_volumetric"]
    vol = np.asarray(volume.values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        concentration = np.where(vol > 0, count_vol / vol * 1000.0, np.nan).astype(np.float32)
    return xr.Dataset(
        {
            "count": (dims, count.astype(np.int64), {"description": "images", "units": "1"}),
            "count_volumetric": (dims, count_vol.astype(np.int64),
                                 {"description": "images of samples with a known volume", "units": "1"}),
            "volume_ml": (dims[1:], vol, {"description": "volume imaged (distinct samples)", "units": "mL"}),
            "concentration": (dims, concentration, {"description": "count_volumetric per litre", "units": "L-1"}),
        },
        coords={
            "taxon": ("taxon", np.asarray(taxa, dtype=str)),
            "time": ("time", time_edges[:-1].values.astype("datetime64[ns]"), {"description": "start of the bin"}),
            "lat": ("lat", (lat_edges[:-1] + lat_edges[1:]) / 2, {"units": "degrees_north"}),
            "lon": ("lon", (lon_edges[:-1] + lon_edges[1:]) / 2, {"units": "degrees_east"}),
        },
    )


def plot_map(ds: xr.Dataset, path: str | Path, *, taxon: str | None = None, variable: str = "count",
             time: str | None = None, storage_options: dict | None = None) -> str:
    """A PNG map of one taxon (default: all taxa summed) over all time bins (or the bin starting at
    ``time``); coastlines when cartopy is installed (the ``maps`` extra)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    if variable not in ds:
        raise InputError(f"no variable {variable!r} in the abundance dataset ({sorted(map(str, ds.data_vars))})")
    field = ds[variable]
    label = "all taxa"
    if taxon is not None:
        if taxon not in ds["taxon"].values:
            raise InputError(f"taxon {taxon!r} not in the abundance dataset ({len(ds['taxon'])} taxa, e.g. "
                             f"{ds['taxon'].values[:5].tolist()})")
        field, label = field.sel(taxon=taxon), taxon
    elif "taxon" in field.dims:
        field = field.sum("taxon", min_count=1)
    when = "all times"
    if time is not None:
        field, when = field.sel(time=np.datetime64(time)), f"bin from {time}"
    elif variable == "concentration":
        field, when = field.mean("time"), "mean over time bins"
    else:
        field = field.sum("time", min_count=1)
    values = np.ma.masked_invalid(np.where(field.values > 0, field.values, np.nan))
    cell = float(ds.attrs.get("cell_deg", np.diff(ds["lat"].values[:2])[0] if len(ds["lat"]) > 1 else 1.0))
    lat_edges = np.r_[ds["lat"].values - cell / 2, ds["lat"].values[-1] + cell / 2]
    lon_edges = np.r_[ds["lon"].values - cell / 2, ds["lon"].values[-1] + cell / 2]
    fig = Figure(figsize=(9, 5), dpi=110)
    FigureCanvasAgg(fig)
    try:
        import cartopy.crs as ccrs  # optional: the `maps` extra

        ax = fig.add_subplot(1, 1, 1, projection=ccrs.PlateCarree())
        ax.coastlines(linewidth=0.5)
        kwargs = {"transform": ccrs.PlateCarree()}
    except ImportError:
        ax = fig.add_subplot(1, 1, 1)
        kwargs = {}
    norm = LogNorm(vmin=max(float(values.min()), 1e-9), vmax=float(values.max())) if values.count() else None
    mesh = ax.pcolormesh(lon_edges, lat_edges, values, norm=norm, cmap="viridis", shading="flat", **kwargs)
    ax.set_xlim(lon_edges[0], lon_edges[-1])
    ax.set_ylim(lat_edges[0], lat_edges[-1])
    ax.set_xlabel("longitude (degrees east)")
    ax.set_ylabel("latitude (degrees north)")
    units = ds[variable].attrs.get("units", "")
    ax.set_title(f"{variable} of {label}, {when} ({ds.attrs.get('rank', '')}, {cell:g} deg cells)")
    fig.colorbar(mesh, ax=ax, label=f"{variable} ({units})" if units else variable, shrink=0.8)
    path = str(path)
    with fsspec.open(path, "wb", **(storage_options or {})) as fh:
        fig.savefig(fh, format="png", bbox_inches="tight")
    return path
