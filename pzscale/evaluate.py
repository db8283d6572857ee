"""Evaluation of stored predictions: accuracy and macro-F1 at every rank, Planktonzilla-style.

At rank k (kingdom = 1 ... species = 7) true and predicted lineages are truncated to their
first k words; a lineage shorter than k contributes its full string ("evaluated only at
ranks where annotated"). Labels without a lineage (detritus, bubble) are one-word strings.
"""

from __future__ import annotations

import pandas as pd

from pzscale import catalog
from pzscale.errors import CatalogError
from pzscale.labels import SPLIT, scores, targets, truncate  # noqa: F401 - re-exported


def _shard(url: str, start: int, stop: int, label: str, split: str, so: dict | None) -> tuple[list, list]:
    group = catalog.open_group(url, storage_options=so, check=False)
    cols = catalog.read_rows(group, start, stop, [SPLIT, "lineage", "proposed_label", "status", label])
    truth = targets(cols)
    keep = (cols[SPLIT] == split) & (truth != "") & (cols[label] != "")
    return truth[keep].tolist(), cols[label][keep].tolist()


def evaluate(url: str, model_id: str, *, split: str = "test", storage_options: dict | None = None) -> pd.DataFrame:
    """Scores of model ``model_id``'s stored predictions on the rows of ``split``."""
    group = catalog.open_group(url, storage_options=storage_options)
    label = f"pred__{model_id}__label"
    arrays = dict(group.arrays())
    for needed, hint in ((label, "pzscale classify"), (SPLIT, "pzscale split")):
        if needed not in arrays:
            raise CatalogError(f"{url}: no {needed}; run {hint} first")
    parts = catalog.map_shards(_shard, url, label, split, storage_options=storage_options)
    truth = [t for p in parts for t in p[0]]
    predicted = [t for p in parts for t in p[1]]
    if not truth:
        raise CatalogError(f"{url}: no labelled, classified rows in split {split!r}")
    return scores(truth, predicted)
