"""Evaluation of stored predictions: accuracy and macro-F1 at every rank, Planktonzilla-style.

At rank k (kingdom = 1 ... species = 7) true and predicted lineages are truncated to their
first k words; a lineage shorter than k contributes its full string ("evaluated only at
ranks where annotated"). Labels without a lineage (detritus, bubble) are one-word strings.
"""

from __future__ import annotations

import pandas as pd
from distributed import Client

from pzscale.errors import CatalogError
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
