"""The quantify stage: per group and taxon, counts and proportions corrected for classifier error, with bootstrap
intervals and concentrations per litre where the sampled volume is known.

Groups are the values of any catalog variable (``source``, ``sample``, ``instrument``...), or bins of a number or
of ``time`` (``bin_by``). The model's behaviour comes from labelled images of its validation split (``split ==
"val"``) in this catalog or in ``validation`` (the catalog it was trained on, for a new cruise without labels):
the confusion rates for ``acc``, the mean posteriors per class for ``pacc``, the class priors for ``em``
(``pzscale.ml.quantification``). Predictions below ``min_prob`` go to an ``unknown`` bin: counted as such by
``cc``, given back to the taxa they come from by ``acc``. Posteriors are the stored top-k, renormalised.

A group's volume is the sum of the volumes of its samples (each sample once), known when every image of the
group has a sample and a volume (``volume_analysed``, mL: IFCB bins, ZooScan scans); concentrations are counts
per litre. Volumes are checked per sample first (``quantification.sample_volumes``): a volume a reader flagged
(an IFCB header run time that cannot be right) or a robust outlier of its source and instrument is ``suspect``
and keeps its groups out of concentrations unless ``keep_suspect_volumes``; ``volume_qc`` says which.
Output: a CSV (``by``, taxon, method, images, count, proportion, ci_low, ci_high, volume_l,
concentration_per_l, volume_qc) and, when asked, the same as an xarray Dataset (group x taxon x method) in Zarr.

``drift`` says which groups a person should look at first: per group, the share of predictions below
``min_prob`` and how far its images' embeddings lie from the training images' (cosine distance to the k-th
nearest of a sample of the training split, against the same distance of the validation images: the share beyond
their 95th percentile), ranked by how much both exceed what the validation split shows.
"""

from __future__ import annotations

import logging

import fsspec
import numpy as np
import pandas as pd
import xarray as xr
from distributed import Client

from pzscale import tables
from pzscale.errors import CatalogError, InputError
from pzscale.ml import quantification as q
from pzscale.schema import RANKS, SPLIT, STATUS_OK, embedding_name, prediction_name
from pzscale.stage import Catalog, map_shards

log = logging.getLogger("pzscale")
UNKNOWN = "unknown"
COLUMNS = ("taxon", "method", "images", "count", "proportion", "ci_low", "ci_high", "volume_l",
           "concentration_per_l", "volume_qc")
VOLUME_COLUMNS = ("sample", "volume_analysed", "qc", "source", "instrument")


def quantify(url: str | Catalog, model: str, classes: list[str], by: str, *, rank: str | None = None,
             methods: tuple[str, ...] = q.METHODS, min_prob: float = 0.5, bin_by: str | float | None = None,
             validation: str | Catalog | None = None, validation_split: str = "val", rounds: int = 100,
             level: float = 0.9, rollup: bool = False, seed: int = 0, keep_suspect_volumes: bool = False,
             out_csv: str | None = None,
             out_zarr: str | None = None, storage_options: dict | None = None, client: Client | None = None
             ) -> pd.DataFrame:
    """Composition of every group of ``by`` under model ``model`` (its id; ``classes`` from its card), one row
    per group, taxon and method (``COLUMNS``); written to ``out_csv`` and ``out_zarr`` when given. ``rollup``:
    estimated once over the model's classes and summed up to every rank (estimates and bootstrap draws alike),
    with a ``rank`` column (``label``: the model's classes; kingdom ... species), so that the ranks add up."""
    if rollup and rank is not None:
        raise InputError("rollup estimates at the model's classes and sums up to every rank: give no rank")
    bad = [m for m in methods if m not in q.METHODS]
    if bad or not methods:
        raise InputError(f"methods {bad or '(none)'}: choose from {', '.join(q.METHODS)}")
    if not 0 <= min_prob <= 1:
        raise InputError(f"min_prob {min_prob}: must be between 0 and 1")
    cat = Catalog.open(url, storage_options)
    taxa, _ = q.taxa_of(classes, rank)
    data = q.read_predictions(cat, model, classes, rank=rank, by=by, extra=VOLUME_COLUMNS, client=client)
    if not data or not len(data["row"]):
        raise CatalogError(f"{cat.url}: no decoded image has a prediction of model {model!r}")
    val = q.validation_predictions(validation or cat, model, classes, rank, validation_split, methods, min_prob,
                                   storage_options, client) if set(methods) & set(q.NEEDS_VALIDATION) else None
    volumes = q.sample_volumes(*(data[c] for c in VOLUME_COLUMNS))
    suspect = volumes.index[volumes["volume_qc"].isin(["implausible", "outlier"])]
    if len(suspect):
        log.warning("%d sample(s) with a suspect volume%s: %s", len(suspect),
                    " (kept)" if keep_suspect_volumes else " (their groups get no concentration)",
                    ", ".join(f"{s} {volumes.loc[s, 'volume_qc']}" for s in suspect[:10])
                    + (" ..." if len(suspect) > 10 else ""))
    keys = q.group_keys(by, data["group"], bin_by)
    levels = [("label", list(classes), None), *((r, *q.taxa_of(classes, r)) for r in RANKS)] if rollup \
        else [(rank, taxa, None)]
    frames = []
    for key, rows in q.group_rows(keys).items():
        group = q.predictions_of(data, len(taxa), min_prob, rows)
        point = q.composition(methods, group, len(taxa), val)
        draws = q.bootstrap_draws(methods, group, len(taxa), val, rounds=rounds, seed=seed, point=point) \
            if rounds else None
        volume_l, volume_qc = _volume_l(data["sample"][rows], volumes, keep_suspect_volumes)
        for rank_name, level_taxa, class_taxon in levels:
            for method, proportion in point.items():
                if class_taxon is not None:  # rolled up from the classes: every rank adds up to the same estimate
                    proportion = q.rolled_up(proportion, class_taxon, len(level_taxa))
                low, high = (np.full(len(level_taxa) + 1, np.nan),) * 2 if draws is None else q.interval(
                    draws[method] if class_taxon is None else q.rolled_up(draws[method], class_taxon,
                                                                          len(level_taxa)), level)
                shown = np.flatnonzero(~np.isnan(proportion))
                count = proportion[shown] * len(rows)
                frames.append(pd.DataFrame({
                    by: key, **({"rank": rank_name} if rollup else {}),
                    "taxon": np.array([*level_taxa, UNKNOWN], dtype=object)[shown], "method": method,
                    "images": len(rows), "count": count, "proportion": proportion[shown], "ci_low": low[shown],
                    "ci_high": high[shown], "volume_l": volume_l, "concentration_per_l": count / volume_l,
                    "volume_qc": volume_qc}))
    table = pd.concat(frames, ignore_index=True)[[by, *(["rank"] if rollup else []), *COLUMNS]]
    if out_csv:
        with fsspec.open(out_csv, "w", newline="", **(storage_options or {})) as fh:
            tables.write_csv(table, fh)
    if out_zarr:
        to_dataset(table, by).to_zarr(out_zarr, mode="w", zarr_format=3, consolidated=False,
                                      storage_options=storage_options)
    return table


def _volume_l(samples: np.ndarray, volumes: pd.DataFrame, keep_suspect: bool) -> tuple[float, str]:
    """Litres imaged in a group (each of its samples' volume once) and its QC: ``unknown`` (NaN litres) unless
    every image has a sample with a volume; ``suspect`` (NaN litres unless ``keep_suspect``) when one of them is
    implausible or an outlier; else ``ok``."""
    if not len(samples) or (samples == "").any():
        return float("nan"), "unknown"
    mine = volumes.loc[pd.unique(samples)]
    if (mine["volume_qc"] == "unknown").any():
        return float("nan"), "unknown"
    if (mine["volume_qc"] != "ok").any():
        return (float(mine["volume_ml"].sum() / 1000.0) if keep_suspect else float("nan")), "suspect"
    return float(mine["volume_ml"].sum() / 1000.0), "ok"


def to_dataset(table: pd.DataFrame, by: str) -> xr.Dataset:
    """The table as a Dataset (``by`` x taxon x method): proportion, count, ci_low, ci_high, concentration_per_l;
    images, volume_l and volume_qc per group."""
    indexed = table.set_index([by, *(["rank"] if "rank" in table else []), "taxon", "method"])
    ds = xr.Dataset.from_dataframe(indexed[["proportion", "count", "ci_low", "ci_high", "concentration_per_l"]])
    per_group = table.drop_duplicates(by).set_index(by)
    ds["images"] = xr.DataArray(per_group["images"].reindex(ds[by].values).to_numpy(), dims=[by])
    ds["volume_l"] = xr.DataArray(per_group["volume_l"].reindex(ds[by].values).to_numpy(), dims=[by])
    ds["volume_qc"] = xr.DataArray(per_group["volume_qc"].reindex(ds[by].values).to_numpy().astype(str), dims=[by])
    ds.attrs["description"] = "composition corrected for classifier error (pzscale quantify)"
    if ds[by].dtype == object:
        ds[by] = ds[by].astype(str)
    ds["taxon"] = ds["taxon"].astype(str)
    ds["method"] = ds["method"].astype(str)
    if "rank" in ds.dims:
        ds["rank"] = ds["rank"].astype(str)
    return ds




# ---------------------------------------------------------------- drift: which groups to look at first

DRIFT_REFERENCE = 20_000  # training images whose embeddings the distances are measured to
DRIFT_NEIGHBOUR = 10  # the k of the k-th nearest neighbour distance
DRIFT_PERCENTILE = 95.0  # of the validation images' distances: beyond it, an image counts as out of distribution


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def knn_distance(x: np.ndarray, reference: np.ndarray, k: int, *, block: int = 4096) -> np.ndarray:
    """Cosine distance of each row of ``x`` to its k-th nearest row of ``reference`` (both unit vectors)."""
    out = np.empty(len(x), np.float32)
    k = min(k, len(reference))
    for lo in range(0, len(x), block):
        similarity = x[lo:lo + block] @ reference.T
        out[lo:lo + block] = 1 - np.partition(similarity, -k, axis=1)[:, -k]
    return out


def _shard_drift(cat: Catalog, start: int, stop: int, embedding: str, prob: str, by: str,
                 reference: np.ndarray, k: int) -> dict[str, np.ndarray]:
    cols = cat.read(start, stop, sorted({embedding, prob, by, "status", SPLIT}))
    vectors = cols[embedding].astype(np.float32)
    keep = (cols["status"] == STATUS_OK) & np.isfinite(vectors).all(axis=1)
    return {"group": cols[by][keep], "prob": cols[prob][keep],
            "split": cols[SPLIT][keep],
            "distance": knn_distance(_unit(vectors[keep]), reference, k)}


def _shard_training_sample(cat: Catalog, start: int, stop: int, embedding: str, per_shard: int,
                           seed: int) -> np.ndarray:
    cols = cat.read(start, stop, [embedding, SPLIT, "status"])
    rows = np.flatnonzero((cols[SPLIT] == "train") & (cols["status"] == STATUS_OK)
                          & np.isfinite(cols[embedding].astype(np.float32)).all(axis=1))
    rng = np.random.default_rng([seed, start])
    return cols[embedding][rng.permutation(rows)[:per_shard]].astype(np.float32)


def _training_sample(cat: Catalog, embedding: str, size: int, seed: int, client: Client | None) -> np.ndarray:
    """Up to ``size`` unit embeddings of training-split images, drawn evenly over the shards."""
    per_shard = max(1, -(-size // max(1, len(cat.shards()))))
    parts = [p for p in map_shards(_shard_training_sample, cat, embedding, per_shard, seed, client=client) if len(p)]
    if not parts:
        raise CatalogError(f"{cat.url}: no training-split image has an embedding in {embedding}; run pzscale split "
                           "and pzscale embed with the model first")
    return _unit(np.concatenate(parts)[:size])


def drift(url: str | Catalog, model: str, by: str, *, embedding: str | None = None, min_prob: float = 0.5,
          bin_by: str | float | None = None, reference_size: int = DRIFT_REFERENCE, k: int = DRIFT_NEIGHBOUR,
          seed: int = 0, out_csv: str | None = None, storage_options: dict | None = None,
          client: Client | None = None) -> pd.DataFrame:
    """Per group of ``by``: images, low_confidence_share (prediction of ``model`` below ``min_prob``),
    knn_distance_median and out_of_distribution_share (see the module doc), and drift_score = the excess of
    both shares over the validation split's, groups ranked by it (highest first)."""
    cat = Catalog.open(url, storage_options)
    embedding = embedding_name(embedding or model)
    prob = prediction_name(model, "prob")
    for name, hint in ((embedding, "pzscale embed"), (prob, "pzscale classify"), (SPLIT, "pzscale split")):
        if name not in cat.arrays():
            raise CatalogError(f"{cat.url}: no {name}; run {hint} first")
    if by not in cat.arrays():
        raise InputError(f"{cat.url}: no variable {by!r} to group by")
    reference = _training_sample(cat, embedding, reference_size, seed, client)
    parts = map_shards(_shard_drift, cat, embedding, prob, by, reference, k, client=client)
    data = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    validation = data["split"] == "val"
    if not validation.any():
        raise CatalogError(f"{cat.url}: no validation-split image with an embedding: nothing to calibrate the "
                           "distances on")
    cutoff = float(np.percentile(data["distance"][validation], DRIFT_PERCENTILE))
    low = data["prob"] < min_prob  # NaN (not classified) is not low confidence
    base_low, base_far = float(low[validation].mean()), 1 - DRIFT_PERCENTILE / 100
    rows = []
    for key, members in q.group_rows(q.group_keys(by, data["group"], bin_by)).items():
        far, unsure = float((data["distance"][members] > cutoff).mean()), float(low[members].mean())
        rows.append({by: key, "images": len(members), "low_confidence_share": unsure,
                     "knn_distance_median": float(np.median(data["distance"][members])),
                     "out_of_distribution_share": far,
                     "drift_score": max(0.0, far - base_far) + max(0.0, unsure - base_low)})
    table = pd.DataFrame(rows).sort_values("drift_score", ascending=False, kind="stable", ignore_index=True)
    table.attrs.update(distance_cutoff=cutoff, validation_low_confidence_share=base_low)
    if out_csv:
        with fsspec.open(out_csv, "w", newline="", **(storage_options or {})) as fh:
            tables.write_csv(table, fh)
    return table
