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
the sum over its distinct samples (the catalog's ``sample``; rows without one: the same source, time,
position, depths and volume), so that 500 images of one bin add its volume once. Volumes are checked per
sample as ``quantify`` checks them; suspect ones are left out unless ``keep_suspect_volumes``.

With a model's predictions, ``correct`` (``pcc``, ``acc`` or ``pacc``, see ``pzscale.ml.quantification``)
adds counts corrected for the classifier's errors: per cell, the composition of its classified images over the
model's classes estimated from their summed posteriors or predicted bins (below ``min_prob``: the unknown bin,
given back to the classes they come from) and the model's confusion on its validation split, summed into the
rank's taxa (so that every rank adds up to the same estimate), times the images. The statistics of a cell are
sums, gathered as per-shard tables like the counts; ``em`` needs each image's posterior at once (``pzscale
quantify --by``). The taxa are then the model's at the rank.

Output Dataset, dims (taxon, time, lat, lon); ``time`` is the start of each bin, lat/lon the
cell centres (lon in -180..180), covering the extent of the data only. A cell with ``images`` 0 has no
data; one with images and a zero count was sampled and the taxon not found (float variables: NaN vs 0):

- ``images`` int64 (time, lat, lon): identified images (annotated, or classified by ``model``) with a position
  and a time: the effort behind the counts;
- ``count`` int64: images;
- ``count_volumetric`` int64: images of samples with a known volume;
- ``volume_ml`` float64 (time, lat, lon): volume imaged in the cell (0 when none known);
- ``concentration`` float32: ``count_volumetric`` per litre (NaN where no volume);
- with ``correct``: ``count_corrected`` float32 (NaN where no image was classified) and
  ``concentration_corrected`` float32 (per litre, NaN where no volume).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import flox.xarray
import fsspec
import numpy as np
import pandas as pd
import scipy.sparse as sp
import xarray as xr
from distributed import Client

from pzscale import grids
from pzscale.errors import CatalogError, InputError
from pzscale.ml import quantification as q
from pzscale.schema import RANKS, STATUS_OK, TIME_FILL, predicting_models, prediction_name
from pzscale.stage import Catalog, map_shards

log = logging.getLogger("pzscale")
TAXON_RANKS = (*RANKS, "lineage")
ZERO_COLOUR = "0.8"  # the map's grey for cells sampled where the taxon was not found


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


POINT_COLUMNS = ("status", "lat", "lon", "time", "volume_analysed", "source", "depth_min", "depth_max", "sample", "qc",
                 "instrument")


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
    identified = "lineage" if model is None else prediction_name(model, "label")
    names = sorted({*POINT_COLUMNS, *(n for n in (*_taxon_arrays(rank, model), identified) if n in present)})
    ds = xr.Dataset({name: ("image", values) for name, values in cat.read(start, stop, names).items()})
    frame = pd.DataFrame({name: ds[name].values for name in POINT_COLUMNS})
    frame["taxon"] = taxon_column(ds, rank, model=model, min_prob=min_prob, where=cat.url).values
    frame["lon"] = (frame["lon"] + 180.0) % 360.0 - 180.0
    # sampled: an identified image (annotated, or classified by the model) with a position and a time
    frame["sampled"] = (frame["status"] == STATUS_OK) & frame["lat"].notna() & frame["lon"].notna() & \
        (frame["time"] != TIME_FILL) & (ds[identified].values != "" if identified in ds else False)
    frame.loc[~frame["sampled"], "taxon"] = ""
    # a volume counts once per sample: the catalog's sample, else (older rows) its source, time, place and volume
    frame["sample_key"] = "sample " + frame["sample"].astype(object).astype(str)
    unnamed = (frame["sample"] == "") & (frame["volume_analysed"] > 0)
    if unnamed.any():
        parts = frame.loc[unnamed, ["source", "time", "lat", "lon", "depth_min", "depth_max", "volume_analysed"]]
        frame.loc[unnamed, "sample_key"] = parts.astype(object).astype(str).agg(" ".join, axis=1)
    return frame


def _scan_shard(cat: Catalog, start: int, stop: int, *args: Any) -> tuple[set, list[float] | None, pd.DataFrame]:
    """Pass 1 over a shard: its taxa, the extent (lat, lon, time min then max) of its sampled images (a
    position and a time), and its distinct samples with a known volume (IFCB bins: one row per bin)."""
    frame = _points(cat, start, stop, *args)
    counted = frame[frame["taxon"] != ""]
    sampled = frame[frame["sampled"]]
    extent = None if sampled.empty else [float(sampled[c].min()) for c in ("lat", "lon", "time")] + \
        [float(sampled[c].max()) for c in ("lat", "lon", "time")]
    keep = (frame["volume_analysed"] > 0) & frame["sampled"]
    samples = frame.loc[keep, ["sample_key", "source", "instrument", "time", "lat", "lon", "volume_analysed"]]
    samples = samples.assign(flagged=frame.loc[keep, "qc"].str.split(";").map(lambda f: q.VOLUME_FLAG in f))
    return set(counted["taxon"].unique()), extent, samples.drop_duplicates("sample_key")


def _cell_of(frame: pd.DataFrame, edges: tuple[np.ndarray, ...]) -> np.ndarray:
    """The flat (time, lat, lon) cell index of each row: left-closed bins, as pandas intervals
    (edge[i] <= x < edge[i + 1]), latitude 90 in the last cell."""
    lat = np.minimum(frame["lat"].to_numpy(np.float64), edges[1][-1] - 1e-9)
    at = (np.searchsorted(edges[0], frame["time"].to_numpy(np.float64), side="right") - 1,
          np.searchsorted(edges[1], lat, side="right") - 1,
          np.searchsorted(edges[2], frame["lon"].to_numpy(np.float64), side="right") - 1)
    return np.ravel_multi_index(at, tuple(len(e) - 1 for e in edges))


def _count_shard(cat: Catalog, start: int, stop: int, rank: str, model: str | None, min_prob: float,
                 present: list[str], taxa: np.ndarray, edges: tuple[np.ndarray, ...],
                 classes: list[str] | None, without_volume: set[str]) -> tuple[pd.DataFrame, pd.DataFrame, dict | None]:
    """Pass 2 over a shard, as small tables of the cells that occur: counts per (taxon, cell), images per cell
    and, with ``classes`` (the model's, for a correction), each cell's sums over them for
    ``quantification.composition_of_sums``."""
    frame = _points(cat, start, stop, rank, model, min_prob, present)
    frame = frame[frame["sampled"]]
    cell = _cell_of(frame, edges)
    volumetric = ((frame["volume_analysed"] > 0) & ~frame["sample_key"].isin(without_volume)).to_numpy(np.int64)
    counted = (frame["taxon"] != "").to_numpy()
    counts = pd.DataFrame({"taxon": np.searchsorted(taxa, frame["taxon"].to_numpy(object)[counted]),
                           "cell": cell[counted], "count": 1, "count_volumetric": volumetric[counted]})
    effort = pd.DataFrame({"cell": cell, "images": 1}).groupby("cell", as_index=False).sum()
    sums = None
    if classes is not None:
        n_taxa = len(classes)
        data = q.shard_predictions(cat, start, stop, model, classes, None, None, (), False)
        where = pd.Series(np.arange(len(frame)), index=frame.index.to_numpy() + start).reindex(data["row"])
        keep = where.notna().to_numpy()  # classified and sampled
        local = where.to_numpy()[keep].astype(np.int64)
        picked = q.predictions_of(data, n_taxa, min_prob, np.flatnonzero(keep))
        cells, inverse = np.unique(cell[local], return_inverse=True)
        bins = np.zeros((len(cells), n_taxa + 1))
        np.add.at(bins, (inverse, picked.predicted), 1.0)
        onehot = sp.csr_matrix((np.ones(len(inverse)), (inverse, np.arange(len(inverse)))),
                               shape=(len(cells), len(inverse)))
        sums = {"cell": cells, "bins": bins, "posteriors": np.asarray((onehot @ picked.posteriors).todense()),
                "volumetric": np.bincount(inverse, weights=volumetric[local], minlength=len(cells))}
    return counts.groupby(["taxon", "cell"], as_index=False).sum(), effort, sums

def abundance(
    url: str,
    *,
    rank: str = "genus",
    model: str | None = None,
    min_prob: float = 0.0,
    cell_deg: float = 1.0,
    time_bin: str = "1MS",
    correct: str | None = None,
    classes: list[str] | None = None,
    validation: str | None = None,
    validation_split: str = "val",
    keep_suspect_volumes: bool = False,
    out: str | None = None,
    storage_options: dict | None = None,
    out_storage_options: dict | None = None,
    client: Client | None = None,
) -> xr.Dataset:
    """Counts (and concentrations where volumes are known) per taxon, time bin and cell.

    Two passes of one read task per shard (on ``client`` or the current one, else in this
    process): taxa, extent and sampled volumes, then counts per cell that occur, summed on the
    client; the result is written to Zarr at ``out`` when given. ``correct``: also counts corrected for
    ``model``'s errors (its ``classes``, from its card), learnt from the labelled images of split
    ``validation_split`` of ``validation`` (default: this catalog). Sample volumes are checked as ``quantify``
    checks them (``quantification.sample_volumes``): a suspect one (flagged by its reader, or a robust outlier of
    its source and instrument) is left out of the volumes and concentrations unless ``keep_suspect_volumes``.
    """
    if not cell_deg > 0:
        raise InputError(f"cell size must be > 0 degrees, not {cell_deg}")
    _offset(time_bin)  # a bad frequency fails before any pass over the catalog
    if correct is not None and (correct not in q.SUMMABLE or model is None or not classes):
        raise InputError(f"correct={correct!r} needs a model with its classes (a model directory) and one of "
                         f"{', '.join(q.SUMMABLE)} (em: pzscale quantify --by)")
    cat = Catalog.open(url, storage_options)
    present = cat.arrays()
    args = (rank, model, min_prob, present)
    _points(cat, 0, 0, *args)  # a rank or model without its arrays fails before any pass
    rates, model_taxa, class_names = None, np.zeros(0, dtype=object), None
    if correct is not None:  # estimated over the model's classes, then summed into the rank's taxa
        prefixes, class_taxon = q.taxa_of(list(classes), None if rank == "lineage" else rank)
        model_taxa = _display_names(prefixes, rank)
        class_names = model_taxa[class_taxon]
        val = None if correct == "pcc" else q.validation_predictions(
            validation or cat, model, list(classes), None, validation_split, (correct,), min_prob, storage_options,
            client)
        rates = q.summed_rates(correct, val, len(classes))
    scans = map_shards(_scan_shard, cat, *args, client=client)
    taxa = np.array(sorted(set().union(*(taxa for taxa, _, _ in scans), model_taxa)), dtype=object)
    extents = np.array([extent for _, extent, _ in scans if extent is not None])
    if not len(taxa) or not len(extents):
        raise InputError(f"{url}: no image with a taxon at rank {rank!r}, a position and a time to count")
    lat0, lon0, t0 = extents[:, :3].min(0)
    lat1, lon1, t1 = extents[:, 3:].max(0)
    lat_edges = _edges(lat0, lat1, cell_deg, -90.0, 90.0)
    lon_edges = _edges(lon0, lon1, cell_deg, -180.0, 180.0)
    time_edges = _time_edges(t0, t1, time_bin)
    time_edges_ms = time_edges.values.astype("datetime64[ms]").astype(np.int64).astype(np.float64)
    edges = (time_edges_ms, lat_edges, lon_edges)
    grid = (len(time_edges_ms) - 1, len(lat_edges) - 1, len(lon_edges) - 1)
    counts = {"count": np.zeros((len(taxa), np.prod(grid)), np.int64),
              "count_volumetric": np.zeros((len(taxa), np.prod(grid)), np.int64)}
    images = np.zeros(np.prod(grid), np.int64)
    samples, without_volume = _checked_samples([samples for _, _, samples in scans], keep_suspect_volumes)
    sums = []
    for part, effort, cell_sums in map_shards(_count_shard, cat, *args, taxa, edges,
                                              list(classes) if correct else None, without_volume, client=client):
        for name, total in counts.items():
            np.add.at(total, (part["taxon"].to_numpy(), part["cell"].to_numpy()), part[name].to_numpy())
        np.add.at(images, effort["cell"].to_numpy(), effort["images"].to_numpy())
        if cell_sums is not None and len(cell_sums["cell"]):
            sums.append(cell_sums)
    bins = tuple(pd.IntervalIndex.from_breaks(e, closed="left") for e in edges)
    volume = _volume_per_cell(samples, bins, lat_edges, cell_deg)
    counts = {name: total.reshape(len(taxa), *grid) for name, total in counts.items()}
    result = _assemble(counts, images.reshape(grid), volume, taxa, time_edges, lat_edges, lon_edges)
    if correct is not None:
        _add_corrected(result, sums, correct, rates, class_names, taxa)
    result.attrs = {
        "catalog": grids.redact(url), "rank": rank, "taxonomy": f"model {model}" if model else "annotations",
        "min_prob": min_prob if model else None, "cell_deg": cell_deg, "time_bin": time_bin,
        "images_counted": int(result["count"].sum()), "samples_with_volume": len(samples),
        "samples_with_suspect_volume": int(samples["suspect"].sum()) if keep_suspect_volumes else len(without_volume),
        "keep_suspect_volumes": keep_suspect_volumes,
        "correction": correct,
        "validation": grids.redact(validation or url) if correct in ("acc", "pacc") else None,
        "description": "image counts per taxon, time bin and lat/lon cell; concentration per litre where the "
                       "sampled volume is known (IFCB); images == 0: no data",
    }
    result.attrs = {k: v for k, v in result.attrs.items() if v is not None}
    if out:
        result.to_zarr(out, mode="w", zarr_format=3, consolidated=False, storage_options=out_storage_options)
    return result


def _display_names(prefixes: list[str], rank: str) -> np.ndarray:
    """The names ``taxon_column`` gives the model's taxa at ``rank`` (a lineage that stops above the rank keeps
    its whole lineage: it has no name there)."""
    if rank == "lineage":
        return np.array(prefixes, dtype=object)
    names = taxon_names(np.array(prefixes, dtype=object), 2 if rank == "species" else 1)
    short = taxon_names(np.array(prefixes, dtype=object), RANKS.index(rank) + 1) == ""
    return np.where(short, np.array(prefixes, dtype=object), names).astype(object)


def _add_corrected(result: xr.Dataset, sums: list[dict], method: str, rates: np.ndarray, class_names: np.ndarray,
                   taxa: np.ndarray) -> None:
    """``count_corrected`` and ``concentration_corrected`` from the per-shard cell sums: per cell, the composition
    over the model's classes by ``method``, summed into the taxa (``class_names``: each class's taxon), times the
    cell's classified images (all of them, or those with a volume, per litre)."""
    shape = (len(taxa), *result["images"].shape)
    corrected = np.full((len(taxa), int(np.prod(shape[1:]))), np.nan, dtype=np.float32)
    volumetric = np.full_like(corrected, np.nan)
    if sums:
        cell = np.concatenate([s["cell"] for s in sums])
        cells, inverse = np.unique(cell, return_inverse=True)
        total = {}
        for key in ("bins", "posteriors", "volumetric"):
            stacked = np.concatenate([s[key] for s in sums])
            total[key] = np.zeros((len(cells), *stacked.shape[1:]))
            np.add.at(total[key], inverse, stacked)
        to_axis = np.searchsorted(taxa, class_names)  # classes of one taxon (or of taxa sharing a name) summed
        for i, c in enumerate(cells):
            proportion = np.bincount(to_axis, q.composition_of_sums(method, total["bins"][i], total["posteriors"][i],
                                                                     rates), minlength=len(taxa))
            corrected[:, c] = proportion * total["bins"][i].sum()
            volumetric[:, c] = proportion * total["volumetric"][i]
    dims = ("taxon", "time", "lat", "lon")
    litres = result["volume_ml"].values.reshape(-1) / 1000.0
    with np.errstate(divide="ignore", invalid="ignore"):
        concentration = np.where(litres > 0, volumetric / litres, np.nan)
    result["count_corrected"] = (dims, corrected.reshape(shape), {
        "description": f"images per taxon corrected for the classifier's errors ({method}); NaN: no classified "
                       "image in the cell", "units": "1"})
    result["concentration_corrected"] = (dims, concentration.reshape(shape).astype(np.float32), {
        "description": f"count_corrected of samples with a known volume per litre ({method})", "units": "L-1"})


def _checked_samples(parts: list[pd.DataFrame], keep_suspect: bool) -> tuple[pd.DataFrame, set[str]]:
    """The distinct samples with a volume (a sample split over two shards: once) that count, and the keys of
    those left out: suspect volumes (``quantification.sample_volumes``) unless ``keep_suspect``."""
    samples = pd.concat(parts, ignore_index=True)
    flagged = samples.groupby("sample_key")["flagged"].any()
    samples = samples.drop_duplicates("sample_key").set_index("sample_key")
    checked = q.sample_volumes(samples.index.to_numpy(), samples["volume_analysed"].to_numpy(),
                               np.where(flagged.reindex(samples.index), q.VOLUME_FLAG, ""),
                               samples["source"].to_numpy(), samples["instrument"].to_numpy())
    samples["suspect"] = checked["volume_qc"].reindex(samples.index).isin(["implausible", "outlier"]).to_numpy()
    if samples["suspect"].any():
        log.warning("%d sample(s) with a suspect volume%s: %s", int(samples["suspect"].sum()),
                    " (kept)" if keep_suspect else " (left out of volumes and concentrations)",
                    ", ".join(samples.index[samples["suspect"]][:10]))
    if keep_suspect:
        return samples.reset_index(), set()
    return samples[~samples["suspect"]].reset_index(), set(samples.index[samples["suspect"]])


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


def _assemble(counts: dict[str, np.ndarray], images: np.ndarray, volume: xr.DataArray, taxa: np.ndarray,
              time_edges: pd.DatetimeIndex, lat_edges: np.ndarray, lon_edges: np.ndarray) -> xr.Dataset:
    dims = ("taxon", "time", "lat", "lon")
    count, count_vol = counts["count"], counts["count_volumetric"]
    vol = np.asarray(volume.values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        concentration = np.where(vol > 0, count_vol / vol * 1000.0, np.nan).astype(np.float32)
    return xr.Dataset(
        {
            "images": (dims[1:], images.astype(np.int64), {
                "description": "identified images with a position and a time (0: no data; a zero count where "
                               "images > 0: sampled, none found)", "units": "1"}),
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
    ``time``): cells sampled without the taxon grey, cells without data left blank; coastlines when cartopy
    is installed (the ``maps`` extra)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap, LogNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

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
    effort = ds.get("images")  # None in older abundance stores: there zero and no data look alike
    if time is not None:
        field, when = field.sel(time=np.datetime64(time)), f"bin from {time}"
        effort = None if effort is None else effort.sel(time=np.datetime64(time))
    elif variable.startswith("concentration"):
        field, when = field.mean("time"), "mean over time bins"
    else:
        field = field.sum("time", min_count=1)
    if effort is not None and "time" in effort.dims:
        effort = effort.sum("time")
    sampled = np.zeros(field.shape, bool) if effort is None else effort.values > 0
    values = np.ma.masked_invalid(np.where(field.values > 0, field.values, np.nan))
    # sampled and none found (0, not NaN): a grey cell; no data: no cell
    zero = np.ma.masked_where(~(sampled & (field.values == 0)), np.zeros(field.shape))
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
    if zero.count():
        ax.pcolormesh(lon_edges, lat_edges, zero, cmap=ListedColormap([ZERO_COLOUR]), shading="flat", **kwargs)
        ax.legend(handles=[Patch(color=ZERO_COLOUR, label="sampled, none found"),
                           Patch(facecolor="none", edgecolor="0.5", label="no data")], loc="lower left",
                  fontsize="small")
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
