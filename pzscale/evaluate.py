"""Evaluation of stored predictions: accuracy and macro-F1 at every rank, Planktonzilla-style.

At rank k (kingdom = 1 ... species = 7) true and predicted lineages are truncated to their
first k words; a lineage shorter than k contributes its full string ("evaluated only at
ranks where annotated"). Labels without a lineage (detritus, bubble) are one-word strings.

``evaluate_by`` scores compositions instead of images: for each group of labelled images (a sample, a source),
the composition each quantification method estimates (``pzscale.ml.quantification``, the model's errors learned
on its validation split) against the true one, as mean absolute error and Bray-Curtis dissimilarity, beside the
group's per-image macro-F1 (González et al. 2017 score plankton classifiers per sample this way).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from distributed import Client
from sklearn.metrics import f1_score

from pzscale.errors import CatalogError
from pzscale.ml import quantification as q
from pzscale.ml.labels import TARGET_COLUMNS, scores, targets, truncate  # noqa: F401 - re-exported
from pzscale.schema import SPLIT, prediction_name
from pzscale.stage import Catalog, map_shards


def _shard(cat: Catalog, start: int, stop: int, label: str, split: str) -> tuple[list, list]:
    cols = cat.read(start, stop, [SPLIT, *TARGET_COLUMNS, label])
    truth = targets(cols)
    keep = (cols[SPLIT] == split) & (truth != "") & (cols[label] != "")
    return truth[keep].tolist(), cols[label][keep].tolist()


def evaluate(url: str | Catalog, model_id: str, *, split: str = "test", storage_options: dict | None = None,
             client: Client | None = None) -> pd.DataFrame:
    """Scores of model ``model_id``'s stored predictions on the rows of ``split`` (one read task per shard,
    on ``client`` or the current one, else in this process)."""
    cat = Catalog.open(url, storage_options)
    url = cat.url
    label = prediction_name(model_id, "label")
    arrays = cat.arrays()
    for needed, hint in ((label, "pzscale classify"), (SPLIT, "pzscale split")):
        if needed not in arrays:
            raise CatalogError(f"{url}: no {needed}; run {hint} first")
    parts = map_shards(_shard, cat, label, split, client=client)
    truth = [t for p in parts for t in p[0]]
    predicted = [t for p in parts for t in p[1]]
    if not truth:
        raise CatalogError(f"{url}: no labelled, classified rows in split {split!r}")
    return scores(truth, predicted)


def evaluate_by(url: str | Catalog, model_id: str, classes: list[str], by: str, *, split: str = "test",
                rank: str | None = None, methods: tuple[str, ...] = q.METHODS, min_prob: float = 0.5,
                bin_by: str | float | None = None, validation_split: str = "val", storage_options: dict | None = None,
                client: Client | None = None) -> pd.DataFrame:
    """Per group of ``by`` among the labelled rows of ``split`` (labels that are taxa of the model) and per method:
    images, absolute_error and bray_curtis of the estimated composition against the true one (over the taxa and
    the unknown bin, so predictions below ``min_prob`` count against cc), macro_f1 of the group's images; then one
    row per method averaged over the groups (group ``"mean"``)."""
    cat = Catalog.open(url, storage_options)
    taxa, _ = q.taxa_of(classes, rank)
    data = q.read_predictions(cat, model_id, classes, rank=rank, by=by, with_truth=True, client=client)
    if not data:
        raise CatalogError(f"{cat.url}: no decoded image has a prediction of model {model_id!r}")
    validation = np.flatnonzero((data[SPLIT] == validation_split) & (data["true"] >= 0))
    if not len(validation) and set(methods) & set(q.NEEDS_VALIDATION):
        raise CatalogError(f"{cat.url}: no labelled image of split {validation_split!r} with a taxon of the model "
                           "and a prediction: nothing to learn the model's errors from")
    val = q.predictions_of(data, len(taxa), min_prob, validation) if len(validation) else None
    scored = (data[SPLIT] == split) & (data["true"] >= 0)
    if not scored.any():
        raise CatalogError(f"{cat.url}: no labelled, classified rows of a taxon of the model in split {split!r}")
    scored_rows = np.flatnonzero(scored)
    rows = []
    for key, members in q.group_rows(q.group_keys(by, data["group"][scored_rows], bin_by)).items():
        members = scored_rows[members]
        group = q.predictions_of(data, len(taxa), min_prob, members)
        # compositions over the taxa and the unknown bin (none truly unknown: cc's unknown share is its error)
        truth = np.r_[np.bincount(group.true, minlength=len(taxa)) / len(members), 0.0]
        f1 = f1_score(group.true, data["predicted"][members], average="macro", zero_division=0)
        for method, estimate in q.composition(methods, group, len(taxa), val).items():
            shares = np.nan_to_num(estimate)
            rows.append({by: key, "method": method, "images": len(members),
                         "absolute_error": q.absolute_error(shares, truth), "bray_curtis": q.bray_curtis(shares, truth),
                         "macro_f1": float(f1)})
    table = pd.DataFrame(rows)
    means = table.groupby("method", sort=False)[["images", "absolute_error", "bray_curtis", "macro_f1"]].mean()
    means = means.reset_index().assign(**{by: "mean"})
    return pd.concat([table, means[table.columns]], ignore_index=True)
