"""Labelled training sets streamed from a catalog split: the rows of a split per shard, seeded batches of
(image ids, class indices, pixels) with one shard's images in memory at a time, and the hash of what was
trained on (recorded in model cards). Shared by the supervised and the CLIP-style training stages.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pzscale import images
from pzscale.errors import CatalogError
from pzscale.ml.labels import TARGET_COLUMNS, targets
from pzscale.schema import SPLIT
from pzscale.stage import Catalog, map_shards, retry

GREY_MEAN, GREY_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _split_shard(cat: Catalog, start: int, stop: int, split: str) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    cols = cat.read(start, stop, [SPLIT, *TARGET_COLUMNS, "image_id"])
    target = targets(cols)
    rows = np.flatnonzero((cols[SPLIT] == split) & (target != ""))
    return start, rows + start, target[rows], cols["image_id"][rows]


def split_rows(url: str | Catalog, split: str, *, storage_options: dict | None = None
               ) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Per shard: (start, catalog rows in ``split``, their targets, their image ids); one read per shard
    (on the current Dask client when there is one)."""
    cat = Catalog.open(url, storage_options)
    if SPLIT not in cat.arrays():
        raise CatalogError(f"{cat.url}: no split recorded; run pzscale split first")
    return map_shards(_split_shard, cat, split)


def batches(group: Any, shards: list, classes: dict[str, int], batch_size: int, rng: np.random.Generator
            ) -> Iterator[tuple[list[str], torch.Tensor, list[np.ndarray]]]:
    """(image ids, class indices, pixels) batches, shards and rows in a seeded random order."""
    ids, ys, pix = [], [], []
    for s in rng.permutation(len(shards)):
        _, rows, target, image_ids = shards[s]
        if not len(rows):
            continue
        perm = rng.permutation(len(rows))
        encoded = retry(group["image_bytes"].get_orthogonal_selection, (rows[perm],))
        for j, data in zip(perm, encoded, strict=True):
            ids.append(str(image_ids[j]))
            ys.append(classes[target[j]])
            pix.append(images.decode(bytes(data)))
            if len(ids) == batch_size:
                yield ids, torch.tensor(ys), pix
                ids, ys, pix = [], [], []
    if ids:
        yield ids, torch.tensor(ys), pix


def training_hash(shards: list) -> str:
    """sha256 of the sorted (image id, label) pairs trained on: what the model card records."""
    pairs = sorted(f"{i}\t{t}" for _, _, target, ids in shards for i, t in zip(ids, target, strict=True))
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()
