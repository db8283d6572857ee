"""Train/val/test splits recorded in the catalog: stratified per source and label, seeded.

As the Planktonzilla protocol: per (source, label) group a 60/20/20 split in a seeded
random order, groups with fewer than ``min_count`` images all in train, and whole held-out
sources marked ``unseen``. The label is the lineage, or the proposed label where there is
no lineage (detritus, bubbles). Rows without a label or an image get "".
"""

from __future__ import annotations

from collections import Counter

import dask
import numpy as np
import pandas as pd

from pzscale import catalog
from pzscale.schema import STATUS_OK

SPLIT = "split"


def targets(cols: dict[str, np.ndarray]) -> np.ndarray:
    """The label a classifier learns: the lineage, else the proposed label; '' when neither or no image."""
    target = np.where(cols["lineage"] != "", cols["lineage"], cols["proposed_label"]).astype(object)
    target[cols["status"] != STATUS_OK] = ""
    return target


def _shard_keys(url: str, start: int, stop: int, seed: int, so: dict | None) -> tuple[np.ndarray, np.ndarray]:
    group = catalog.open_group(url, storage_options=so, check=False)
    cols = catalog.read_rows(group, start, stop, ["source", "lineage", "proposed_label", "status", "image_id"])
    target = targets(cols)
    keys = np.where(target != "", cols["source"].astype(object) + "\x1f" + target, "").astype(object)
    # a seeded order that does not depend on where a row sits in the catalog
    order = pd.util.hash_array(cols["image_id"].astype(object), hash_key=f"pzscale{seed:09d}"[:16])
    return keys, order


def _write_shard(url: str, start: int, stop: int, values: np.ndarray, so: dict | None) -> int:
    group = catalog.open_group(url, mode="r+", storage_options=so, check=False)
    catalog.write_arrays(group, start, stop, {SPLIT: values})
    return stop - start


def assign_splits(
    url: str,
    *,
    seed: int = 42,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    min_count: int = 5,
    unseen_sources: tuple[str, ...] = (),
    storage_options: dict | None = None,
) -> dict[str, int]:
    """Write the ``split`` variable (train / val / test / unseen / '') and return its counts.

    Memory on the client is one hash and one group code per image (about 12 bytes), so 17M
    images need about 200 MB; the reads and writes run one task per shard.
    """
    so = storage_options
    group = catalog.open_group(url, mode="r+", storage_options=so)
    n_rows, shard_len = catalog.n_rows_of(group), catalog.metadata(group)["shard_len"]
    ranges = catalog.shard_ranges(0, n_rows, shard_len)
    parts = catalog.map_shards(_shard_keys, url, seed, storage_options=so)
    keys = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, object)
    order = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.uint64)
    codes, groups = pd.factorize(keys)  # '' (no label) is a group too; handled below
    split = np.full(len(keys), "", dtype=object)
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
    split[sort] = names
    labelled = keys != ""
    split[~labelled] = ""
    if unseen_sources:
        sources = np.array([k.split("\x1f", 1)[0] for k in keys], dtype=object)
        split[labelled & np.isin(sources, list(unseen_sources))] = "unseen"
    catalog.ensure_array(group, SPLIT, dtype="str", fill="", attrs={
        "description": "train/val/test (stratified per source and label), unseen (held-out sources)",
        "seed": seed, "fractions": list(fractions), "min_count": min_count, "unseen_sources": list(unseen_sources)})
    dask.compute(*[dask.delayed(_write_shard)(url, a, b, split[a:b], so) for _, a, b in ranges])
    catalog.record_stage(group, SPLIT, {
        "seed": seed, "fractions": list(fractions), "min_count": min_count, "unseen_sources": list(unseen_sources),
        "groups": int(len(groups) - ("" in set(groups)))})
    return dict(Counter(split.tolist()))
