"""Near duplicates by banded pHash: candidates from a Dask shuffle on band keys (never all pairs), checked by
Hamming distance and then by the correlation of the images' DCT profiles (see the package doc)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from itertools import combinations
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
from distributed import Client

from pzscale import imagehash
from pzscale.dedup.common import BIG_BUCKET, PAIR_BLOCK, PHASH, PHASH_PROFILE, SMALL_BUCKET, TILE
from pzscale.dedup.graph import components, spanning_forest
from pzscale.errors import InputError
from pzscale.schema import STATUS_OK
from pzscale.stage import Catalog, map_shards, retry


@dataclass(frozen=True)
class BandSpec:
    """64 bits cut into ``bands`` contiguous bands; a key is a combination of ``bands - threshold`` of them."""

    threshold: int
    bands: int

    @cached_property
    def band_masks(self) -> np.ndarray:
        widths = [64 // self.bands + (1 if i < 64 % self.bands else 0) for i in range(self.bands)]
        offsets = np.cumsum([0, *widths[:-1]])
        return np.array([((1 << w) - 1) << int(o) for w, o in zip(widths, offsets, strict=True)], np.uint64)

    @cached_property
    def combos(self) -> list[tuple[int, ...]]:
        """The keys' band combinations, in lexicographic order."""
        return list(combinations(range(self.bands), self.bands - self.threshold))

    @cached_property
    def key_masks(self) -> np.ndarray:
        """The bit mask of every key (union of its bands' masks)."""
        return np.array([np.bitwise_or.reduce(self.band_masks[list(c)]) for c in self.combos], np.uint64)

    @cached_property
    def first_key_table(self) -> np.ndarray | None:
        """Key index of the first ``bands - threshold`` bands set in each ``bands``-bit pattern of equal bands
        (-1 where fewer are set); None when 2**bands is too many to tabulate."""
        if self.bands > 20:
            return None
        patterns = np.arange(2**self.bands, dtype=np.int64)
        bits = (patterns[:, None] >> np.arange(self.bands)) & 1
        first = bits.astype(bool) & (np.cumsum(bits, axis=1) <= self.bands - self.threshold)
        index = {sum(1 << b for b in c): k for k, c in enumerate(self.combos)}
        codes = (first * (1 << np.arange(self.bands))).sum(1)
        return np.array([index.get(int(c), -1) for c in codes], np.int32)

    @property
    def key_bits(self) -> float:
        return 64 * (self.bands - self.threshold) / self.bands

    @property
    def n_keys(self) -> int:
        return math.comb(self.bands, self.threshold)


# Relative cost of shuffling one (key, hash) record, in units of one verified candidate pair (measured on 2
# cores: ~1 us per shuffled record against ~10 ns per vectorised Hamming check, see benchmarks/bench_dedup.py).
RECORD_COST = 12.0


MAX_KEYS = 1024


def choose_bands(threshold: int, n_hashes: int) -> int:
    """The number of bands minimising records shuffled + pairs compared, for uniformly spread hashes.

    Each unique hash makes ``C(bands, threshold)`` records; a bucket holds about ``n / 2**key_bits`` hashes.
    """
    if not 0 <= threshold < 64:
        raise InputError(f"near threshold {threshold}: must be between 0 and 63 bits")
    best, best_cost = threshold + 1, math.inf
    for bands in range(threshold + 1, min(64, threshold + 8) + 1):
        spec = BandSpec(threshold, bands)
        if spec.n_keys > MAX_KEYS and bands > threshold + 1:
            break
        cost = spec.n_keys * n_hashes * (RECORD_COST + n_hashes / 2 ** spec.key_bits / 2)
        if cost < best_cost:
            best, best_cost = bands, cost
    return best


def _near_frame(start: int, stop: int, cat: Catalog) -> pd.DataFrame:
    return retry(_read_near, cat, start, stop)


def _read_near(cat: Catalog, start: int, stop: int) -> pd.DataFrame:
    cols = cat.read(start, stop, ["status", PHASH])
    return pd.DataFrame({"phash": np.unique(cols[PHASH][cols["status"] == STATUS_OK])})


def band_records(part: pd.DataFrame, spec: BandSpec) -> pd.DataFrame:
    """One (key, value, phash) record per unique hash and key: ``value`` is the hash masked to the key's bands."""
    h = part["phash"].to_numpy(np.uint64)
    masks = spec.key_masks
    return pd.DataFrame({"key": np.repeat(np.arange(len(masks), dtype=np.int32), len(h)),
                         "value": (masks[:, None] & h[None, :]).ravel(),
                         "phash": np.tile(h, len(masks))})


def first_keys(a: np.ndarray, b: np.ndarray, spec: BandSpec) -> np.ndarray:
    """The index of the first key two hashes within the threshold agree on (their first ``bands - threshold``
    equal bands), so that each pair is reported by one bucket only."""
    x = a ^ b
    equal = np.zeros(len(x), np.int64)
    for i, mask in enumerate(spec.band_masks):  # one pass per band over the pairs: the equal-band pattern
        equal |= ((x & mask) == 0).astype(np.int64) << i
    table = spec.first_key_table
    if table is not None:
        return table[equal]
    bits = ((equal[:, None] >> np.arange(spec.bands)) & 1).astype(bool)
    first = bits & (np.cumsum(bits, axis=1) <= spec.bands - spec.threshold)
    index = {sum(1 << b for b in c): k for k, c in enumerate(spec.combos)}
    return np.array([index.get(int(c), -1) for c in (first * (1 << np.arange(spec.bands))).sum(1)], np.int64)


def bucket_pairs(part: pd.DataFrame, spec: BandSpec) -> tuple[pd.DataFrame, dict]:
    """Verified pairs (Hamming <= threshold) of the hashes sharing a (key, value) bucket in one partition.

    Returns the pairs and counts (pairs compared, largest bucket). Buckets up to ``SMALL_BUCKET`` hashes are
    verified together, vectorised over buckets of the same size; larger ones in tiles, reduced to a forest.
    """
    empty = pd.DataFrame({"a": np.zeros(0, np.uint64), "b": np.zeros(0, np.uint64)})
    stats = {"pairs_compared": 0, "largest_bucket": 0}
    if len(part) < 2:
        return empty, stats
    key, value, h = (part[c].to_numpy() for c in ("key", "value", "phash"))
    order = np.lexsort((h, value, key))
    key, value, h = key[order], value[order], h[order].astype(np.uint64)
    starts = np.flatnonzero(np.r_[True, (key[1:] != key[:-1]) | (value[1:] != value[:-1])])
    sizes = np.diff(np.r_[starts, len(h)])
    stats["largest_bucket"] = int(sizes.max())
    stats["pairs_compared"] = int((sizes * (sizes - 1) // 2).sum())
    out_a, out_b = [], []

    def verified(a: np.ndarray, b: np.ndarray, bucket_key: np.ndarray) -> None:
        close = imagehash.hamming(a, b) <= spec.threshold
        a, b, bucket_key = a[close], b[close], bucket_key[close]
        mine = first_keys(a, b, spec) == bucket_key
        out_a.append(a[mine])
        out_b.append(b[mine])

    for size in np.unique(sizes[(sizes >= 2) & (sizes <= SMALL_BUCKET)]):
        first = starts[sizes == size]
        upper = np.triu(np.ones((size, size), bool), 1)
        per_block = max(1, PAIR_BLOCK // int(size * size))
        for lo in range(0, len(first), per_block):
            block = h[first[lo : lo + per_block, None] + np.arange(size)]  # (buckets, size)
            close = (imagehash.hamming(block[:, :, None], block[:, None, :]) <= spec.threshold) & upper
            bi, ii, jj = np.nonzero(close)
            verified(block[bi, ii], block[bi, jj], key[first[lo + bi]])
    for start, size in zip(starts[sizes > SMALL_BUCKET], sizes[sizes > SMALL_BUCKET], strict=True):
        bucket, bucket_key = h[start : start + size], key[start]
        before = len(out_a)
        for i0 in range(0, size, TILE):
            for j0 in range(i0, size, TILE):
                dist = imagehash.hamming(bucket[i0 : i0 + TILE, None], bucket[None, j0 : j0 + TILE])
                ii, jj = np.nonzero(dist <= spec.threshold)
                upper = (ii + i0) < (jj + j0)
                a, b = bucket[ii[upper] + i0], bucket[jj[upper] + j0]
                verified(a, b, np.full(len(a), bucket_key))
            if size > BIG_BUCKET and len(out_a) > before:  # keep a forest: memory stays linear in the bucket
                a, b = spanning_forest(np.concatenate(out_a[before:]), np.concatenate(out_b[before:]))
                del out_a[before:], out_b[before:]
                out_a.append(a)
                out_b.append(b)
    if not out_a:
        return empty, stats
    return pd.DataFrame({"a": np.concatenate(out_a), "b": np.concatenate(out_b)}), stats


def near_pairs(client: Client, frame: dd.DataFrame, spec: BandSpec, n_parts: int) -> tuple[pd.DataFrame, dict]:
    """All pairs of distinct hashes of ``frame`` (column ``phash``) within the threshold, each once (for a bucket
    above ``BIG_BUCKET``, a spanning forest of its pairs: the same connected components), and counts."""
    unique = frame.drop_duplicates(split_out=n_parts)
    meta = pd.DataFrame({"key": np.zeros(0, np.int32), "value": np.zeros(0, np.uint64),
                         "phash": np.zeros(0, np.uint64)})
    records = unique.map_partitions(band_records, spec, meta=meta)
    shuffled = records.shuffle(on=["key", "value"], npartitions=n_parts)
    results = client.gather(client.compute([dask.delayed(bucket_pairs)(p, spec) for p in shuffled.to_delayed()]))
    pairs = pd.concat([r[0] for r in results], ignore_index=True)
    stats = {"pairs_compared": sum(r[1]["pairs_compared"] for r in results),
             "largest_bucket": max((r[1]["largest_bucket"] for r in results), default=0)}
    return pairs, stats


def near_groups(client: Client, cat: Catalog, ok: np.ndarray, phash: np.ndarray, threshold: int,
                bands: int | None, similarity: float | None) -> tuple[np.ndarray, dict]:
    """Component label per row: rows linked by chains of pairs within ``threshold`` bits whose DCT profiles
    correlate at ``similarity`` or more (no profile check when ``similarity`` is None)."""
    unique, inverse = np.unique(phash[ok], return_inverse=True)
    spec = BandSpec(threshold, bands or choose_bands(threshold, len(unique)))
    meta = pd.DataFrame({"phash": np.zeros(0, np.uint64)})
    ranges = cat.shards()
    frame = dd.from_map(_near_frame, [a for _, a, _ in ranges], [b for _, _, b in ranges], cat=cat,
                        meta=meta, enforce_metadata=False)
    pairs, stats = near_pairs(client, frame, spec, max(1, len(ranges)))
    ia, ib = np.searchsorted(unique, pairs["a"].to_numpy()), np.searchsorted(unique, pairs["b"].to_numpy())
    facts = {"threshold": threshold, "similarity": similarity, "bands": spec.bands, "keys": spec.n_keys,
             "unique_hashes": len(unique), "links": len(pairs), **stats}
    labels = np.full(len(ok), -1, np.int64)
    if similarity is None:
        comp = components(len(unique), ia, ib, np.ones(len(unique), bool))
        labels[ok] = comp[inverse]
        return labels, facts
    rows = np.flatnonzero(ok)
    a, b, checked = similar_row_pairs(inverse, ia, ib, similarity,
                                      lambda needed: _gather_profiles(client, cat, rows[needed]))
    labels[ok] = components(len(rows), a, b, np.ones(len(rows), bool))
    return labels, {**facts, "row_pairs_checked": checked, "row_pairs_similar": len(a)}


def similar_row_pairs(value_of: np.ndarray, ia: np.ndarray, ib: np.ndarray, similarity: float,
                      profiles_of: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Pairs of items (rows) whose profiles correlate at ``similarity`` or more, among the candidates: items of
    one hash value with each other, and items of values ``ia[k]`` with items of values ``ib[k]``.

    ``value_of``: each item's index into the unique hashes; ``profiles_of(items)``: their (n, 63) profiles.
    Returns (a, b, candidate pairs checked); a block of candidates larger than ``PAIR_BLOCK`` (thousands of
    items sharing one hash, e.g. blank frames) is compared in tiles and only a spanning forest of its similar
    pairs is kept, which links the same items.
    """
    by_value = np.argsort(value_of, kind="stable")
    counts = np.bincount(value_of, minlength=int(value_of.max(initial=-1)) + 1)
    first = np.r_[0, np.cumsum(counts)[:-1]]
    shared = np.flatnonzero(counts > 1)
    # blocks of candidates: (value x, value y); x == y means pairs within one value
    bx, by = np.r_[shared, ia].astype(np.int64), np.r_[shared, ib].astype(np.int64)
    size = counts[bx] * counts[by]
    if not len(bx):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    needed_values = np.unique(np.r_[bx, by])
    needed = np.concatenate([by_value[first[v] : first[v] + counts[v]] for v in needed_values])
    needed.sort()
    profile = profiles_of(needed)  # float16, rows of ``needed``
    slot = lambda items: np.searchsorted(needed, items)  # noqa: E731

    def similar(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        pa, pb = profile[slot(a)].astype(np.float32), profile[slot(b)].astype(np.float32)
        return np.einsum("ij,ij->i", pa, pb) >= similarity

    out_a, out_b, checked = [], [], 0
    small = np.flatnonzero(size <= PAIR_BLOCK)
    # expand the small blocks' cross products a few million pairs at a time
    ends = np.cumsum(size[small])
    lo = 0
    while lo < len(small):
        hi = int(np.searchsorted(ends, (ends[lo - 1] if lo else 0) + PAIR_BLOCK, side="right"))
        hi = max(hi, lo + 1)
        blocks = small[lo:hi]
        n = size[blocks]
        block = np.repeat(np.arange(len(blocks)), n)
        t = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        cy = counts[by[blocks]][block]
        i, j = t // cy, t % cy
        same = bx[blocks][block] == by[blocks][block]
        keep = ~same | (i < j)
        a = by_value[first[bx[blocks]][block] + i][keep]
        b = by_value[first[by[blocks]][block] + j][keep]
        checked += len(a)
        close = similar(a, b)
        out_a.append(a[close])
        out_b.append(b[close])
        lo = hi
    for k in np.flatnonzero(size > PAIR_BLOCK):
        xs = by_value[first[bx[k]] : first[bx[k]] + counts[bx[k]]]
        ys = by_value[first[by[k]] : first[by[k]] + counts[by[k]]]
        forest_a, forest_b = np.zeros(0, np.int64), np.zeros(0, np.int64)
        for i0 in range(0, len(xs), TILE):
            px = profile[slot(xs[i0 : i0 + TILE])].astype(np.float32)
            for j0 in range(0, len(ys), TILE):
                sim = px @ profile[slot(ys[j0 : j0 + TILE])].astype(np.float32).T
                checked += sim.size
                ii, jj = np.nonzero(sim >= similarity)
                a, b = xs[ii + i0], ys[jj + j0]
                forest_a, forest_b = np.r_[forest_a, a[a != b]], np.r_[forest_b, b[a != b]]
                if len(forest_a):  # a spanning forest after every tile: memory stays linear in the block
                    forest_a, forest_b = spanning_forest(forest_a, forest_b)
        out_a.append(forest_a)
        out_b.append(forest_b)
    return np.concatenate(out_a), np.concatenate(out_b), checked


def _shard_profiles(cat: Catalog, start: int, stop: int, rows: np.ndarray) -> np.ndarray:
    lo, hi = np.searchsorted(rows, [start, stop])
    return cat.group()[PHASH_PROFILE][start:stop][rows[lo:hi] - start]


def _gather_profiles(client: Client, cat: Catalog, rows: np.ndarray) -> np.ndarray:
    """``phash_profile`` of sorted catalog ``rows``: each shard with some of them is read once, by one task."""
    ranges = [(s, a, b) for s, a, b in cat.shards() if np.searchsorted(rows, a) < np.searchsorted(rows, b)]
    parts = map_shards(_shard_profiles, cat, rows, client=client, ranges=ranges)
    return np.concatenate(parts) if parts else np.zeros((0, imagehash.PROFILE_LEN), np.float16)
