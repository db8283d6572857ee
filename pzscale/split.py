"""Train/val/test splits recorded in the catalog: stratified per source and label, seeded.

As the Planktonzilla protocol: per (source, label) group a 60/20/20 split in a seeded
random order, groups with fewer than ``min_count`` images all in train, and whole held-out
sources set aside as the ``unseen`` benchmark, which keeps only classes absent from the
training split. The label is the lineage, or the proposed label where there is no lineage
(detritus, bubbles), or the source's raw label where no taxonomy table mapped it (class folders).
Values of the ``split`` variable:

- ``train``, ``val``, ``test``: rows of the other sources;
- ``unseen``: held-out rows whose label does not occur in ``train`` (the unseen benchmark);
- ``unseen_seen_class``: held-out rows whose label does occur in ``train`` (not in the benchmark);
- ``unseen_duplicate``: held-out rows in a duplicate group that also has train/val/test rows
  (only with ``dedup``; not in the benchmark);
- ``""``: rows without a label or without an image.

With ``dedup`` the duplicate groups found by the dedup stage (``dup_exact``, ``dup_near``,
``dup_semantic``: per row the catalog row of its group's kept row, -1 for rows without an image)
are joined into connected components, and a component never straddles train/val/test: all its
rows take the split of one member (the first in the seeded order). The paper has no such guard.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd
from distributed import Client
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pzscale.errors import CatalogError
from pzscale.ml.labels import TARGET_COLUMNS, targets
from pzscale.schema import DUPLICATE_METHODS, SPLIT, duplicate_name
from pzscale.stage import Catalog, ShardResult, ShardTask, map_shards, pending, run_stage

UNSEEN, UNSEEN_SEEN_CLASS, UNSEEN_DUPLICATE = "unseen", "unseen_seen_class", "unseen_duplicate"
DUPLICATE_ARRAYS = tuple(duplicate_name(m) for m in DUPLICATE_METHODS)
# the Planktonzilla paper's held-out sources (its unseen benchmark: 220 classes, 113,089 images)
PAPER_UNSEEN_SOURCES = ("global_uvp5", "planktoscope", "planktonset1.0", "syke_ifcb_2022")


def _shard_keys(cat: Catalog, start: int, stop: int, seed: int, duplicates: list[str]) -> tuple:
    cols = cat.read(start, stop, ["source", *TARGET_COLUMNS, "image_id", *duplicates])
    # a seeded order that does not depend on where a row sits in the catalog
    order = pd.util.hash_array(cols["image_id"].astype(object), hash_key=f"pzscale{seed:09d}"[:16])
    dup = np.stack([cols[d].astype(np.int64) for d in duplicates], 1) if duplicates else np.zeros((stop - start, 0))
    return cols["source"].astype(object), targets(cols), order, dup


def _write_shard(task: ShardTask) -> ShardResult:
    task.catalog.write(task.start, task.stop, {SPLIT: task.params["values"]})
    return ShardResult(task.stop - task.start, {SPLIT: {"params": task.params["digest"]}}, replace=True)


def duplicate_components(groups: np.ndarray) -> np.ndarray:
    """Connected components of the union of duplicate groupings.

    ``groups`` is (n, m): per row, in each of m groupings, the row of its group's kept row (its own row
    when unique, -1 when not grouped). Returns a component label per row.
    """
    n = len(groups)
    rows = np.repeat(np.arange(n), groups.shape[1])
    linked = groups.reshape(-1)
    if ((linked < -1) | (linked >= n)).any():
        raise CatalogError(f"duplicate group ids must be -1 or a catalog row below {n}")
    edge = linked >= 0
    graph = coo_matrix((np.ones(int(edge.sum()), np.int8), (rows[edge], linked[edge])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _stratified(keys: np.ndarray, order: np.ndarray, fractions: tuple[float, float, float], min_count: int
                ) -> np.ndarray:
    codes, _ = pd.factorize(keys)
    sort = np.lexsort((order, codes))
    sorted_codes = codes[sort]
    group_start = np.r_[0, np.flatnonzero(np.diff(sorted_codes)) + 1]
    sizes = np.diff(np.r_[group_start, len(sort)])
    rank = np.arange(len(sort)) - np.repeat(group_start, sizes)
    size = np.repeat(sizes, sizes)
    n_train = np.round(size * fractions[0]).astype(int)
    n_val = np.round(size * fractions[1]).astype(int)
    names = np.where(rank < n_train, "train", np.where(rank < n_train + n_val, "val", "test")).astype(object)
    names[size < min_count] = "train"
    split = np.empty(len(keys), dtype=object)
    split[sort] = names
    return split


def _first_member_split(split: np.ndarray, component: np.ndarray, order: np.ndarray, members: np.ndarray
                        ) -> np.ndarray:
    """Each member row takes the split of its component's first member in the seeded order."""
    idx = np.flatnonzero(members)
    by_component = idx[np.lexsort((order[idx], component[idx]))]
    first = by_component[np.r_[True, np.diff(component[by_component]) != 0]] if len(idx) else idx
    chosen = np.full(component.max() + 1 if len(component) else 0, "", dtype=object)
    chosen[component[first]] = split[first]
    out = split.copy()
    out[idx] = chosen[component[idx]]
    return out


def _duplicate_arrays(cat: Catalog, dedup: bool | str | Sequence[str]) -> list[str]:
    if dedup is False or dedup is None:
        return []
    url, present = cat.url, set(cat.arrays())
    if dedup is True:
        names = [d for d in DUPLICATE_ARRAYS if d in present]
        if not names:
            raise CatalogError(f"{url}: no duplicate groups ({', '.join(DUPLICATE_ARRAYS)}); run pzscale dedup first")
        return names
    names = [dedup] if isinstance(dedup, str) else list(dedup)
    missing = [d for d in names if d not in present]
    if missing:
        raise CatalogError(f"{url}: no array {missing[0]} for a dedup-aware split; run pzscale dedup first")
    return names


def assign_splits(
    url: str,
    *,
    seed: int = 42,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    min_count: int = 5,
    unseen_sources: tuple[str, ...] = (),
    dedup: bool | str | Sequence[str] = False,
    storage_options: dict | None = None,
    client: Client | None = None,
) -> dict[str, int]:
    """Write the ``split`` variable (see the module docstring) and return its counts.

    ``dedup``: True to keep the duplicate groups of every ``dup_*`` array present inside one split, or
    the name(s) of the arrays to use. Memory on the client is about 30 bytes per image plus the
    duplicate groups (8 bytes per image and grouping); reads and writes run one task per shard (on
    ``client`` or the current one; reads run in this process without one). A shard is marked done
    with the parameters' digest, so a rerun with the same parameters writes only unmarked shards.
    """
    cat = Catalog.open(url, storage_options)
    duplicates = _duplicate_arrays(cat, dedup)
    parts = map_shards(_shard_keys, cat, seed, duplicates, client=client)
    source = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, object)
    target = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, object)
    order = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.uint64)
    labelled = target != ""
    held_out = np.isin(source, list(unseen_sources))
    split = _stratified((source + "\x1f" + target).astype(object), order, fractions, min_count)
    split[~labelled] = ""
    if duplicates:
        component = duplicate_components(np.concatenate([p[3] for p in parts]))
        split = _first_member_split(split, component, order, labelled & ~held_out)
    split[labelled & held_out] = UNSEEN
    in_training = np.isin(target, pd.unique(target[split == "train"]))
    split[(split == UNSEEN) & in_training] = UNSEEN_SEEN_CLASS
    if duplicates:
        seen_components = np.unique(component[labelled & ~held_out])
        split[(split == UNSEEN) & np.isin(component, seen_components)] = UNSEEN_DUPLICATE
    record = {"seed": seed, "fractions": list(fractions), "min_count": min_count,
              "unseen_sources": list(unseen_sources), "dedup": duplicates}
    cat.ensure_array(SPLIT, dtype="str", fill="", attrs={
        "description": "train/val/test (stratified per source and label); unseen (held-out sources, classes "
                       "absent from train); unseen_seen_class, unseen_duplicate (held-out rows left out of the "
                       "unseen benchmark); '' (no label or no image)", **record})
    # the split of every row depends on all rows: a grown catalog is split again whole
    digest = hashlib.sha256(json.dumps({**record, "rows": cat.n_rows}, sort_keys=True).encode()).hexdigest()[:16]
    tasks, skipped = pending(cat, SPLIT, valid=lambda info: info.get("params") == digest)
    tasks = [replace(t, row_from=t.start, params={"values": split[t.start:t.stop], "digest": digest}) for t in tasks]
    run_stage(SPLIT, _write_shard, tasks, catalog=cat, client=client, skipped=skipped, progress_bar=False)
    keys = pd.unique((source + "\x1f" + target)[labelled])
    cat.record_stage(SPLIT, {**record, "groups": int(len(keys))})
    return dict(Counter(split.tolist()))
