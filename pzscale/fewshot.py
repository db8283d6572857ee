"""SimpleShot few-shot classification on stored embeddings, as the Planktonzilla protocol runs it.

Features are centred on the mean embedding of the ``train`` split and L2-normalised. In each episode
(one seed, k shots) every class of the evaluated split gets k support images drawn from that split; its
prototype is the mean of their features, and every other image of the split is a query given the class of
the nearest prototype (Euclidean). Episodes run for k = 1 and 5 and seeds 0, 7, 25, 42, 100; macro-F1 per
rank is averaged over the seeds. A class with at most k images gives n - 1 supports, so that one query
remains; a class of a single image is a prototype without queries. The k-shot supports of a seed contain
its (k-1)-shot ones (one seeded order per class), so shot counts are compared on paired draws.

Embeddings are any stored (rows x D) array: ``emb__<id>`` of ``pzscale embed`` or ``emb__<id>__zs`` of the
zero-shot stage. Per-image work (the train mean, the queries) runs one task per shard; the client holds
only labels, the support features and the predictions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from distributed import Client

from pzscale.errors import CatalogError
from pzscale.ml.labels import TARGET_COLUMNS, scores, targets
from pzscale.schema import SPLIT
from pzscale.stage import Catalog, map_shards, retry

SEEDS = (0, 7, 25, 42, 100)
SHOTS = (1, 5)


def _scan(cat: Catalog, start: int, stop: int, embedding: str, split: str, centre_split: str
          ) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """A shard's sum and count of centring features, and its evaluated rows with their labels."""
    cols = cat.read(start, stop, [SPLIT, *TARGET_COLUMNS, embedding])
    target = targets(cols)
    features = cols[embedding].astype(np.float32)
    finite = np.isfinite(features).all(1)
    centre = (cols[SPLIT] == centre_split) & finite
    evaluated = np.flatnonzero((cols[SPLIT] == split) & (target != "") & finite)
    return features[centre].sum(0, dtype=np.float64), int(centre.sum()), evaluated + start, target[evaluated]


def normalise(features: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """SimpleShot's CL2N: centre on ``mean``, then L2-normalise each row."""
    centred = features.astype(np.float32) - mean.astype(np.float32)
    return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)


def draw_supports(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Boolean mask of the support rows of an episode: per class min(k, n - 1) rows (1 if n == 1), seeded."""
    rng = np.random.default_rng(seed)
    codes, _ = pd.factorize(labels)
    order = np.lexsort((rng.permutation(len(labels)), codes))  # classes together, seeded order inside
    sorted_codes = codes[order]
    first = np.r_[0, np.flatnonzero(np.diff(sorted_codes)) + 1]
    sizes = np.diff(np.r_[first, len(order)])
    rank = np.arange(len(order)) - np.repeat(first, sizes)
    quota = np.repeat(np.where(sizes > 1, np.minimum(shots, sizes - 1), 1), sizes)
    mask = np.zeros(len(labels), bool)
    mask[order] = rank < quota
    return mask


def nearest_prototype(queries: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """Index of the nearest prototype (Euclidean) of each normalised query."""
    # ||q - p||^2 = ||q||^2 - 2 q.p + ||p||^2, and ||q||^2 is the same for every prototype
    distance = (prototypes**2).sum(1)[None, :] - 2.0 * queries @ prototypes.T
    return distance.argmin(1)


def _predict(cat: Catalog, start: int, stop: int, embedding: str, mean: np.ndarray, episodes: list[dict],
             rows: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per episode: this shard's query rows and their predicted class index."""
    here = rows[(rows >= start) & (rows < stop)]
    features = normalise(cat.group()[embedding][start:stop][here - start], mean)
    out = []
    for episode in episodes:
        query = ~np.isin(here, episode["support_rows"])
        out.append((here[query], nearest_prototype(features[query], episode["prototypes"]).astype(np.int32)))
    return out


def fewshot(
    url: str,
    embedding: str,
    *,
    split: str = "test",
    shots: Sequence[int] = SHOTS,
    seeds: Sequence[int] = SEEDS,
    centre_split: str = "train",
    storage_options: dict | None = None,
    client: Client | None = None,
) -> pd.DataFrame:
    """SimpleShot scores of the embedding array ``embedding`` on the rows of ``split``.

    Returns one row per (shots, rank): macro-F1 and accuracy averaged over ``seeds`` (and the standard
    deviation of macro-F1), queries and classes. One read task per shard on ``client`` or the current
    one (in this process without one).
    """
    cat = Catalog.open(url, storage_options)
    url = cat.url
    arrays = dict(retry(lambda: dict(cat.group().arrays())))
    for needed, hint in ((embedding, "pzscale embed or pzscale zeroshot"), (SPLIT, "pzscale split")):
        if needed not in arrays:
            raise CatalogError(f"{url}: no {needed}; run {hint} first")
    if arrays[embedding].ndim != 2:
        raise CatalogError(f"{url}: {embedding} is not a (rows x features) embedding array")
    parts = map_shards(_scan, cat, embedding, split, centre_split, client=client)
    count = sum(p[1] for p in parts)
    if not count:
        raise CatalogError(f"{url}: no {centre_split} rows with {embedding}; cannot centre the features")
    mean = (sum(p[0] for p in parts) / count).astype(np.float32)
    rows = np.concatenate([p[2] for p in parts])
    labels = np.concatenate([p[3] for p in parts]).astype(object)
    if not len(rows):
        raise CatalogError(f"{url}: no labelled rows with {embedding} in split {split!r}")
    classes, codes = np.unique(labels, return_inverse=True)
    episodes = []
    for seed in seeds:
        for k in shots:
            support = draw_supports(labels, k, seed)
            features = normalise(retry(arrays[embedding].get_orthogonal_selection, (rows[support],)), mean)
            prototypes = np.zeros((len(classes), features.shape[1]), np.float32)
            np.add.at(prototypes, codes[support], features)
            prototypes /= np.bincount(codes[support], minlength=len(classes))[:, None]
            episodes.append({"shots": k, "seed": seed, "support_rows": rows[support], "prototypes": prototypes})
    # map_shards sends the episodes and rows to the workers once, not once per shard task
    per_shard = map_shards(_predict, cat, embedding, mean, episodes, rows, client=client)
    truth_of = dict(zip(rows.tolist(), labels, strict=True))
    tables = []
    for i, episode in enumerate(episodes):
        query_rows = np.concatenate([shard[i][0] for shard in per_shard])
        predicted = classes[np.concatenate([shard[i][1] for shard in per_shard])]
        table = scores([truth_of[r] for r in query_rows.tolist()], predicted.tolist())
        tables.append(table.assign(shots=episode["shots"], seed=episode["seed"]))
    every = pd.concat(tables, ignore_index=True)
    return (every.groupby(["shots", "rank"], sort=False)
            .agg(macro_f1=("macro_f1", "mean"), macro_f1_std=("macro_f1", "std"), accuracy=("accuracy", "mean"),
                 queries=("images", "mean"), classes=("classes", "max"))
            .reset_index())
