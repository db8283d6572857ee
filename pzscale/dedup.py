"""The dedup stage: exact, near (perceptual hash) and semantic duplicate groups over a catalog, with reports.

Phases, each on the Dask cluster:

1. **Hash pass** (stage ``dedup_hash``, one task per shard, resumable and incremental after an append): decode
   every image once and store ``pixel_hash`` (blake2b-128 of the decoded pixels, dtype and shape, as two uint64:
   re-encoded copies match, see ``imagehash``), ``phash`` (64-bit pHash, bit-compatible with imagededup) and
   ``phash_profile`` (the pHash's 63 DCT coefficients as a unit vector, float16).
2. **Exact**: a dask.dataframe of (row, pixel hash) shuffled on the hash; each run of equal hashes is a group.
3. **Near**: identical pHashes are collapsed first (so a bucket of blank frames is one node, not n^2 pairs), then
   the 64 bits are cut into ``bands`` bands and every unique hash is emitted once per *key*, a combination of
   ``bands - threshold`` bands. Two hashes within Hamming distance ``threshold`` differ in at most ``threshold``
   bands, so they agree on at least one key (pigeonhole; with ``bands = threshold + 1`` a key is a single band,
   the classic scheme). Records are shuffled on (key, value); within each bucket the pairs are verified by
   Hamming distance and each pair is kept only in the first key it agrees on, so it is emitted once. Buckets
   of up to ``SMALL_BUCKET`` hashes are verified together, vectorised across buckets; larger ones in tiles of
   ``TILE`` x ``TILE`` hashes, and above ``BIG_BUCKET`` their links are reduced to a spanning forest as they
   go, so memory stays bounded. A bucket's time is still quadratic in its size (look-alike images make full
   buckets), and the report gives the largest bucket and the pairs compared, so the bands can be raised.
   ``bands=None`` picks the number of bands from the number of unique hashes with a cost model (records
   shuffled vs. pairs compared). The rows behind each verified pair of hashes (and rows sharing one hash) are
   then checked on their DCT profiles: a pair is kept if the profiles correlate at ``near_similarity`` (0.97)
   or more, since unrelated ROIs of similar shape and angle often lie within 8 bits (on synth data, pHash bits
   alone give a pair precision of 0.3 at 16k images). Each shard task returns the profiles of its candidate
   rows; the check runs on the client, a few million pairs at a time. Groups are the connected components
   (scipy) of the kept pairs: one int per image on the client, never all pairs.
4. **Semantic** (SemDeDup on a stored ``emb__<model>`` array): spherical k-means (torch, on the GPU when there is
   one) on a sample of L2-normalised embeddings, every row assigned to its nearest centroid per shard, the rows
   regrouped by cluster with a Dask array shuffle, then within each cluster cosine similarity > 1 - ``eps``
   links two rows; clusters are compared in tiles of ``TILE`` rows, so the similarity matrix is never whole
   (one cluster's embeddings must fit in a worker's memory). Duplicates across clusters are missed, as in
   SemDeDup. Each row's highest similarity to another row of its cluster feeds a histogram for choosing eps.

Outputs (arrays on ``image``, written shard by shard):

- ``dup_exact``, ``dup_near``, ``dup_semantic`` (int64): the group id of each row, which is the catalog row of
  the group's kept row; a row without duplicates has its own row; -1 where the row has no image (status not
  ok) or, for semantic, no embedding.
- ``dup_keep`` (bool): True for exactly one row of every group of the union of the methods run (rows linked by
  any method are one group). **Keep rule**, the same for every group: the row with a taxonomy lineage first,
  then the larger image (width x height), then the earlier catalog row (earlier ingested source, then its own
  order). Rows without an image are never kept.
- Reports under ``_pzscale/reports/dedup/`` (Parquet, readable with pandas from a local or s3:// catalog):
  ``<method>_pairs`` (every duplicate row paired with its group's kept row), ``<method>_cross_source`` (those
  pairs whose two rows come from different sources), ``<method>_leakage`` (written by ``leakage_report``: rows
  whose duplicate sits in an earlier split of train/val/test/unseen) and ``semantic_similarity_histogram``.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from itertools import combinations
from typing import Any

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import scipy.sparse
from distributed import Client, get_client
from scipy.sparse.csgraph import connected_components

from pzscale import catalog, imagehash, images
from pzscale.errors import CatalogError, InputError, StageError
from pzscale.progress import StageReport, run_shards
from pzscale.schema import STATUS_OK

METHODS = ("exact", "near", "semantic")
HASH_STAGE = "dedup_hash"
STAGE = "dedup"
PIXEL_HASH, PHASH, PHASH_PROFILE, KEEP = "pixel_hash", "phash", "phash_profile", "dup_keep"
HASH_ARRAYS = (PIXEL_HASH, PHASH, PHASH_PROFILE)  # what the hash pass writes (a marker lists them)
GROUP = {m: f"dup_{m}" for m in METHODS}
REPORTS = "reports/dedup"  # under the catalog's private prefix
# Practitioners use 5-10 bits of 64 (anchors.md section 4; imagededup's default is 10). 8, because at 10 two
# distinct ROIs of the real IFCB bin D20220522T000439_IFCB134 (distance 10) merge. pHash bits are thresholded
# at the median of 63 coefficients, so every hash has the same number of ones and distances are even: 8 ~ 9.
DEFAULT_NEAR_THRESHOLD = 8
# pHash pairs within the threshold are also checked on the DCT profiles (imagehash.dct_profiles). On pzscale
# synth data (16k images) planted near copies (rescaled, re-toned, shifted, JPEG q70) correlate at >= 0.984 and
# unrelated look-alikes within 10 bits at <= 0.960; pHash bits alone give a pair precision of 0.3 there.
DEFAULT_NEAR_SIMILARITY = 0.97
DEFAULT_EPS = 0.01  # NeMo Curator's SemDeDup default: cosine > 0.99
SPLITS = ("train", "val", "test", "unseen")
KEEP_RULE = "has taxonomy lineage > larger image (width*height) > earlier catalog row"

DECODE_BATCH = 512  # images decoded and hashed at once in a shard task
SMALL_BUCKET = 64  # buckets up to this size are verified all at once, vectorised across buckets
BIG_BUCKET = 4096  # larger buckets are verified in tiles and reduced to a spanning forest
TILE = 2048
PAIR_BLOCK = 4_000_000  # hash comparisons held in memory at once
KMEANS_SAMPLE = 100_000
KMEANS_ITERS = 25
HIST_EDGES = np.r_[-1.0, np.linspace(0.5, 1.0, 101)]


# ---------------------------------------------------------------- report and helpers


@dataclass
class DedupReport:
    """What a dedup run found, per method, for the CLI, the demo and notebooks."""

    catalog: str
    methods: tuple[str, ...]
    rows: int
    images: int
    hash_stage: StageReport
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)
    kept: int = 0
    seconds: float = 0.0

    @property
    def removed(self) -> int:
        """Rows with an image that ``dup_keep`` drops."""
        return self.images - self.kept

    def __str__(self) -> str:
        lines = [str(self.hash_stage),
                 f"dedup -> {self.catalog}: {self.images:,} images of {self.rows:,} rows, methods "
                 f"{', '.join(self.methods)}; keep {self.kept:,}, drop {self.removed:,} ({KEEP_RULE}); "
                 f"{self.seconds:.1f} s"]
        for method, info in self.per_method.items():
            extra = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in info.items()
                              if k not in ("groups", "duplicates", "cross_source_pairs"))
            lines.append(f"  {method:8s}: {info['groups']:,} groups with {info['duplicates']:,} duplicate rows, "
                         f"{info['cross_source_pairs']:,} across sources ({extra})")
        return "\n".join(lines)


@contextmanager
def _quiet_shuffle_log() -> Iterator[None]:
    """distributed logs every P2P shuffle's start and end at WARNING; a local scheduler would print them all."""
    log = logging.getLogger("distributed.shuffle._scheduler_plugin")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _client(client: Client | None) -> Client:
    try:
        return client or get_client()
    except ValueError:
        raise StageError("no Dask client: start one with pzscale.cluster.connect()") from None


def _methods(methods: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    items = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    unknown = sorted(set(items) - set(METHODS))
    if unknown or not items:
        raise InputError(f"dedup methods {items or methods!r}: choose among {', '.join(METHODS)}")
    return tuple(m for m in METHODS if m in items)


def _ranges(group: Any) -> list[tuple[int, int, int]]:
    return catalog.shard_ranges(0, catalog.n_rows_of(group), catalog.metadata(group)["shard_len"])


def _gather(client: Client, fn: Any, ranges: list[tuple[int, int, int]], *args: Any) -> list:
    """``fn(start, stop, *args)`` per shard on the cluster, results in shard order."""
    futures = [client.submit(fn, a, b, *args, pure=False) for _, a, b in ranges]
    return client.gather(futures)


def report_path(url: str, name: str, *, storage_options: dict | None = None) -> tuple[Any, str]:
    """(filesystem, path) of a dedup report table inside the catalog (``_pzscale/reports/dedup/<name>.parquet``)."""
    fs, root = catalog._fs(url, storage_options)
    return fs, f"{root}/{catalog.PRIVATE}/{REPORTS}/{name}.parquet"


def write_report(url: str, name: str, table: pd.DataFrame, *, storage_options: dict | None = None) -> str:
    fs, path = report_path(url, name, storage_options=storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    fs.pipe_file(path, buf.getvalue())
    return path


def read_report(url: str, name: str, *, storage_options: dict | None = None) -> pd.DataFrame:
    """A dedup report table as a DataFrame; CatalogError when it was never written."""
    fs, path = report_path(url, name, storage_options=storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise CatalogError(f"{url}: no dedup report '{name}' (run pzscale dedup with that method first)") from None
    return pd.read_parquet(io.BytesIO(data))


# ---------------------------------------------------------------- phase 1: hash pass


def _hash_tasks(url: str, so: dict | None) -> tuple[list[dict], int]:
    """Shards with rows not hashed yet (markers record the rows they cover, so an append only adds the tail).

    A marker that does not list every array of ``HASH_ARRAYS`` (a catalog hashed by an older pzscale) has the
    whole shard hashed again, its marker replaced."""
    group = catalog.open_group(url, storage_options=so)
    infos = catalog.marker_infos(url, HASH_STAGE, storage_options=so)
    done = {s: info["rows"][1] for s, info in infos.items() if set(HASH_ARRAYS) <= set(info.get("arrays", ()))}
    tasks, skipped = [], 0
    for shard, start, stop in _ranges(group):
        row_from = max(start, done.get(shard, start))
        if row_from >= stop:
            skipped += 1
        else:
            tasks.append({"shard": shard, "start": start, "row_from": row_from, "stop": stop,
                          "replace": shard in infos and shard not in done})
    return tasks, skipped


def hash_shard(task: dict) -> dict:
    """Decode rows [row_from, stop) of one shard in batches, write the ``HASH_ARRAYS``, then the marker."""
    started = time.perf_counter()
    url, so = task["catalog"], task["storage_options"]
    group = catalog.open_group(url, mode="r+", storage_options=so, check=False)
    start, row_from, stop = task["start"], task["row_from"], task["stop"]
    ok = np.flatnonzero(group["status"][row_from:stop] == STATUS_OK)
    pixel = np.zeros((stop - row_from, 2), np.uint64)
    phash = np.zeros(stop - row_from, np.uint64)
    profile = np.zeros((stop - row_from, imagehash.PROFILE_LEN), np.float16)
    for lo in range(0, len(ok), DECODE_BATCH):
        sel = ok[lo : lo + DECODE_BATCH]
        encoded = group["image_bytes"].get_orthogonal_selection((sel + row_from,))
        pixels = [images.decode(bytes(b)) for b in encoded]
        pixel[sel] = imagehash.pixel_hashes(pixels)
        phash[sel], profile[sel] = imagehash.phashes_and_profiles(pixels)
    new = catalog.with_stored_rows(group, start, row_from, {PIXEL_HASH: pixel, PHASH: phash, PHASH_PROFILE: profile})
    catalog.write_arrays(group, start, stop, new)
    catalog.mark_done(url, HASH_STAGE, task["shard"], {"rows": [start, stop], "computed": stop - row_from,
                                                        "arrays": list(HASH_ARRAYS)},
                      storage_options=so, replace=task.get("replace", False))
    return {"shard": task["shard"], "rows": stop - row_from, "seconds": time.perf_counter() - started}


def hash_images(url: str, *, client: Client | None = None, storage_options: dict | None = None,
                progress: bool = True) -> StageReport:
    """The hash pass alone (resumable): ``pixel_hash``, ``phash`` and ``phash_profile`` for every row not hashed
    yet."""
    client = _client(client)
    group = catalog.open_group(url, mode="r+", storage_options=storage_options)
    catalog.ensure_array(group, PIXEL_HASH, dtype="uint64", fill=0, trailing=(2,), dims=("hash_word",), attrs={
        "description": "blake2b-128 of the decoded pixels, dtype and shape (two big-endian uint64 words); "
                       "0 where the row has no image"})
    catalog.ensure_array(group, PHASH, dtype="uint64", fill=0, attrs={
        "description": "64-bit pHash as imagededup.methods.PHash (first bit most significant); 0 without image"})
    catalog.ensure_array(group, PHASH_PROFILE, dtype="float16", fill=0, trailing=(imagehash.PROFILE_LEN,),
                         dims=("dct_coefficient",), attrs={
        "description": "the 63 AC coefficients of the pHash's 8 x 8 DCT block, orthonormal scaling, unit length: "
                       "dot products are correlations of low-passed thumbnails; 0 without image"})
    tasks, skipped = _hash_tasks(url, storage_options)
    common = {"catalog": url, "storage_options": storage_options}
    run = run_shards(client, hash_shard, [{**t, **common} for t in tasks], desc=HASH_STAGE, skipped=skipped,
                     show=progress)
    report = StageReport(HASH_STAGE, url, len(tasks) + skipped, skipped, len(run.results), run.images, run.seconds,
                         [f"shard {t['shard']}: {m}" for t, m in run.failures])
    if run.failures:
        raise StageError(f"{len(run.failures)} shard(s) failed; rerun to resume:\n{report}")
    return report


def _row_info(start: int, stop: int, url: str, with_phash: bool, so: dict | None) -> dict[str, np.ndarray]:
    group = catalog.open_group(url, storage_options=so, check=False)
    cols = catalog.read_rows(group, start, stop, ["status", "lineage", "width", "height"])
    out = {"ok": cols["status"] == STATUS_OK, "labelled": cols["lineage"] != "",
           "area": cols["width"].astype(np.int64) * cols["height"].astype(np.int64)}
    if with_phash:
        out["phash"] = group[PHASH][start:stop]
    return out


# ---------------------------------------------------------------- groups and the keep rule


def rank_order(ok: np.ndarray, labelled: np.ndarray, area: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, rank): rows with an image from best to worst under the keep rule, and each row's position
    in that order (a large number for rows without an image)."""
    rows = np.flatnonzero(ok)
    order = rows[np.lexsort((rows, -area[rows], ~labelled[rows]))]
    rank = np.full(len(ok), np.iinfo(np.int64).max, np.int64)
    rank[order] = np.arange(len(order))
    return order, rank


def kept_rows(labels: np.ndarray, order: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Group id per row from component labels (-1 = not in any group): the best-ranked row of its component."""
    out = np.full(len(labels), -1, np.int64)
    valid = np.flatnonzero(labels >= 0)
    if not len(valid):
        return out
    lab = labels[valid]
    _, comp = np.unique(lab, return_inverse=True)
    best = np.full(comp.max() + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(best, comp, rank[valid])
    out[valid] = order[best[comp]]
    return out


def components(n: int, a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Connected-component label per row of the graph with edges (a, b); -1 where not ``valid``."""
    graph = scipy.sparse.coo_matrix((np.ones(len(a), np.int32), (np.asarray(a, np.int64), np.asarray(b, np.int64))),
                                    shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    return np.where(valid, labels, -1).astype(np.int64)


def _summary(group_of: np.ndarray) -> dict[str, int]:
    """Groups of two or more rows, rows that are not their group's kept row, and the largest group (a giant
    group means chains of look-alikes: lower the threshold or eps)."""
    dup = (group_of >= 0) & (group_of != np.arange(len(group_of)))
    sizes = np.bincount(group_of[group_of >= 0]) if (group_of >= 0).any() else np.zeros(1, np.int64)
    return {"groups": int(len(np.unique(group_of[dup]))), "duplicates": int(dup.sum()),
            "largest_group": int(sizes.max())}


# ---------------------------------------------------------------- exact


def _exact_frame(start: int, stop: int, url: str, so: dict | None) -> pd.DataFrame:
    group = catalog.open_group(url, storage_options=so, check=False)
    ok = group["status"][start:stop] == STATUS_OK
    words = group[PIXEL_HASH][start:stop]
    return pd.DataFrame({"row": (np.flatnonzero(ok) + start).astype(np.int64),
                         "h0": words[ok, 0], "h1": words[ok, 1]})


def _exact_edges(part: pd.DataFrame) -> pd.DataFrame:
    """Each row of a run of equal pixel hashes linked to the run's first row."""
    if len(part) < 2:
        return pd.DataFrame({"a": np.zeros(0, np.int64), "b": np.zeros(0, np.int64)})
    part = part.sort_values(["h0", "h1", "row"])
    h0, h1, rows = part["h0"].to_numpy(), part["h1"].to_numpy(), part["row"].to_numpy()
    new = np.r_[True, (h0[1:] != h0[:-1]) | (h1[1:] != h1[:-1])]
    first = rows[np.flatnonzero(new)][np.cumsum(new) - 1]
    linked = first != rows
    return pd.DataFrame({"a": first[linked], "b": rows[linked]})


def exact_groups(client: Client, url: str, ranges: list, n_rows: int, ok: np.ndarray,
                 so: dict | None) -> tuple[np.ndarray, dict]:
    """Component label per row: rows with the same pixel hash (shuffle on the hash)."""
    meta = pd.DataFrame({"row": np.zeros(0, np.int64), "h0": np.zeros(0, np.uint64), "h1": np.zeros(0, np.uint64)})
    frame = dd.from_map(_exact_frame, [a for _, a, _ in ranges], [b for _, _, b in ranges], url=url, so=so,
                        meta=meta, enforce_metadata=False)
    shuffled = frame.shuffle(on=["h0", "h1"], npartitions=max(1, len(ranges)))
    parts = client.gather(client.compute([dask.delayed(_exact_edges)(p) for p in shuffled.to_delayed()]))
    edges = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"a": [], "b": []})
    labels = components(n_rows, edges["a"].to_numpy(), edges["b"].to_numpy(), ok)
    return labels, {"edges": len(edges)}


# ---------------------------------------------------------------- near: banded pHash


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


def _near_frame(start: int, stop: int, url: str, so: dict | None) -> pd.DataFrame:
    group = catalog.open_group(url, storage_options=so, check=False)
    ok = group["status"][start:stop] == STATUS_OK
    return pd.DataFrame({"phash": np.unique(group[PHASH][start:stop][ok])})


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


def _forest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges of a spanning forest of the graph on hash values (a, b): each node linked to its component's root."""
    nodes, inv = np.unique(np.r_[a, b], return_inverse=True)
    labels = components(len(nodes), inv[: len(a)], inv[len(a) :], np.ones(len(nodes), bool))
    order = np.lexsort((nodes, labels))
    first = np.r_[True, labels[order][1:] != labels[order][:-1]]
    root = order[np.flatnonzero(first)][np.cumsum(first) - 1]
    keep = root != order
    return nodes[root[keep]], nodes[order[keep]]


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
                a, b = _forest(np.concatenate(out_a[before:]), np.concatenate(out_b[before:]))
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


def near_groups(client: Client, url: str, ranges: list, ok: np.ndarray, phash: np.ndarray, threshold: int,
                bands: int | None, similarity: float | None, so: dict | None) -> tuple[np.ndarray, dict]:
    """Component label per row: rows linked by chains of pairs within ``threshold`` bits whose DCT profiles
    correlate at ``similarity`` or more (no profile check when ``similarity`` is None)."""
    unique, inverse = np.unique(phash[ok], return_inverse=True)
    spec = BandSpec(threshold, bands or choose_bands(threshold, len(unique)))
    meta = pd.DataFrame({"phash": np.zeros(0, np.uint64)})
    frame = dd.from_map(_near_frame, [a for _, a, _ in ranges], [b for _, _, b in ranges], url=url, so=so,
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
                                      lambda needed: _gather_profiles(client, url, ranges, rows[needed], so))
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
                    forest_a, forest_b = _forest(forest_a, forest_b)
        out_a.append(forest_a)
        out_b.append(forest_b)
    return np.concatenate(out_a), np.concatenate(out_b), checked


def _shard_profiles(start: int, stop: int, url: str, rows: np.ndarray, so: dict | None) -> np.ndarray:
    group = catalog.open_group(url, storage_options=so, check=False)
    return group[PHASH_PROFILE][start:stop][rows - start]


def _gather_profiles(client: Client, url: str, ranges: list, rows: np.ndarray, so: dict | None) -> np.ndarray:
    """``phash_profile`` of sorted catalog ``rows``: each shard task reads its shard once and returns its rows."""
    futures = []
    for _, start, stop in ranges:
        lo, hi = np.searchsorted(rows, [start, stop])
        if hi > lo:
            futures.append(client.submit(_shard_profiles, start, stop, url, rows[lo:hi], so, pure=False))
    parts = client.gather(futures)
    return np.concatenate(parts) if parts else np.zeros((0, imagehash.PROFILE_LEN), np.float16)


# ---------------------------------------------------------------- semantic: SemDeDup


def embedding_name(group: Any, embedding: str | None) -> str:
    """The ``emb__<model>`` array to use: the one given (array name or model id), or the only one there is."""
    present = sorted(n for n in group.array_keys() if n.startswith("emb__"))
    if embedding is None:
        if len(present) == 1:
            return present[0]
        if not present:
            raise CatalogError("semantic dedup needs an embedding array emb__<model> in the catalog; "
                               "run `pzscale embed` first")
        raise CatalogError(f"several embedding arrays {present}: choose one with embedding=")
    name = embedding if embedding.startswith("emb__") else f"emb__{embedding}"
    if name not in present:
        raise CatalogError(f"no embedding array {name} in the catalog (present: {present or 'none'})")
    return name


def _unit_rows(start: int, stop: int, url: str, name: str, so: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised float32 embeddings of rows [start, stop) (zeros where invalid) and the valid mask."""
    group = catalog.open_group(url, storage_options=so, check=False)
    emb = group[name][start:stop].astype(np.float32)
    norm = np.linalg.norm(emb, axis=1)
    valid = (group["status"][start:stop] == STATUS_OK) & np.isfinite(norm) & (norm > 0)
    out = np.zeros_like(emb)
    out[valid] = emb[valid] / norm[valid, None]
    return out, valid


def _unit_block(start: int, stop: int, url: str, name: str, so: dict | None) -> np.ndarray:
    return _unit_rows(start, stop, url, name, so)[0]


def _sample_shard(start: int, stop: int, url: str, name: str, fraction: float, seed: int,
                  so: dict | None) -> np.ndarray:
    emb, valid = _unit_rows(start, stop, url, name, so)
    rows = np.flatnonzero(valid)
    rng = np.random.default_rng([seed, start])
    return emb[rows[rng.random(len(rows)) < fraction]]


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def spherical_kmeans(sample: np.ndarray, k: int, *, iters: int = KMEANS_ITERS, seed: int = 0,
                     device: str | None = None) -> np.ndarray:
    """Lloyd iterations on the unit sphere (cosine similarity), in torch; unit centroids (k, D) float32.

    Empty clusters are re-seeded with the points farthest from their centroid.
    """
    import torch

    device = device or _device()
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(sample, np.float32)).to(device)
    k = max(1, min(k, len(x)))
    centroids = x[torch.randperm(len(x), generator=gen)[:k].to(device)].clone()
    for _ in range(iters):
        sim = x @ centroids.T
        best, assign = sim.max(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            sums[empty] = x[torch.argsort(best)[: len(empty)]]
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids.cpu().numpy()


def _assign_shard(start: int, stop: int, url: str, name: str, centroids: np.ndarray, so: dict | None) -> np.ndarray:
    emb, valid = _unit_rows(start, stop, url, name, so)
    labels = np.full(stop - start, -1, np.int64)
    rows = np.flatnonzero(valid)
    for lo in range(0, len(rows), 2048):  # bounded memory: 2048 x k similarities at a time
        part = rows[lo : lo + 2048]
        labels[part] = np.argmax(emb[part] @ centroids.T, axis=1)
    return labels


class _Tiles:
    """Similarity tiles of one cluster, in numpy on the CPU or in torch on a GPU worker."""

    def __init__(self, x: np.ndarray, device: str | None):
        self.device = device
        if device:
            import torch

            self.torch = torch
            self.x = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device)
        else:
            self.x = np.ascontiguousarray(x, np.float32)

    def tile(self, i0: int, j0: int, size: int, threshold: float) -> tuple[np.ndarray, ...]:
        """Row maxima, column maxima and the (i, j) above ``threshold`` of one tile (self-pairs excluded)."""
        sim = self.x[i0 : i0 + size] @ self.x[j0 : j0 + size].T
        if self.device:
            if i0 == j0:
                sim.fill_diagonal_(-2.0)
            ii, jj = self.torch.nonzero(sim > threshold, as_tuple=True)
            out = (sim.max(1).values, sim.max(0).values, ii, jj)
            return tuple(v.cpu().numpy() for v in out)
        if i0 == j0:
            np.fill_diagonal(sim, -2.0)
        ii, jj = np.nonzero(sim > threshold)
        return sim.max(1), sim.max(0), ii, jj

    def dot(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if self.device:
            ia, ib = (self.torch.from_numpy(v).to(self.device) for v in (a, b))
            return (self.x[ia] * self.x[ib]).sum(1).cpu().numpy()
        return np.einsum("ij,ij->i", self.x[a], self.x[b])


def semantic_block(block: np.ndarray, rows: np.ndarray, clusters: np.ndarray, ranks: np.ndarray, eps: float,
                   device: str | None = None, tile: int = TILE) -> dict[str, Any]:
    """SemDeDup within the clusters of one block (the rows of a cluster are contiguous).

    Links rows whose cosine similarity exceeds ``1 - eps``, comparing ``tile`` x ``tile`` rows at a time and
    keeping only a spanning forest of the links, so memory stays linear in the cluster. Returns, for rows in a
    group of two or more, the kept row (lowest ``ranks``) and the similarity to it, and a histogram of every
    row's highest similarity to another row of its cluster. ``device``: None (numpy) or a torch device.
    """
    bounds = np.r_[np.flatnonzero(np.r_[True, clusters[1:] != clusters[:-1]]), len(rows)] if len(rows) else [0]
    member, root, similarity, best_sims = [], [], [], []
    largest = 0
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        n = int(hi - lo)
        largest = max(largest, n)
        if n < 2:
            continue
        tiles = _Tiles(block[lo:hi], device)
        max_sim = np.full(n, -1.0, np.float32)
        ea, eb = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for i0 in range(0, n, tile):
            for j0 in range(i0, n, tile):
                row_max, col_max, ii, jj = tiles.tile(i0, j0, tile, 1 - eps)
                max_sim[i0 : i0 + tile] = np.maximum(max_sim[i0 : i0 + tile], row_max)
                max_sim[j0 : j0 + tile] = np.maximum(max_sim[j0 : j0 + tile], col_max)
                ea.append(ii + i0)
                eb.append(jj + j0)
            if sum(len(e) for e in ea) > 4 * n:  # keep only a spanning forest of the links
                a, b = _forest(np.concatenate(ea), np.concatenate(eb))
                ea, eb = [a], [b]
        best_sims.append(max_sim)
        a, b = np.concatenate(ea), np.concatenate(eb)
        if not len(a):
            continue
        labels = components(n, a, b, np.ones(n, bool))
        in_group = np.flatnonzero(np.bincount(labels)[labels] > 1)
        # the kept row of each component: its member with the lowest rank
        by_best = in_group[np.lexsort((ranks[lo:hi][in_group], labels[in_group]))]
        first = np.r_[True, labels[by_best][1:] != labels[by_best][:-1]]
        kept_of = np.zeros(n, np.int64)
        kept_of[labels[by_best][first]] = by_best[first]
        kept = kept_of[labels[in_group]]
        member.append(rows[lo:hi][in_group])
        root.append(rows[lo:hi][kept])
        similarity.append(tiles.dot(in_group, kept))
    hist = np.histogram(np.concatenate(best_sims) if best_sims else np.zeros(0), bins=HIST_EDGES)[0]

    def cat(parts: list, dtype: Any) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    return {"member": cat(member, np.int64), "root": cat(root, np.int64), "similarity": cat(similarity, np.float32),
            "histogram": hist, "largest_cluster": largest}


def gpu_workers(client: Client) -> bool:
    """Whether the cluster's workers advertise the ``GPU`` resource (dask-cuda with --resources GPU=1)."""
    return any(w.get("resources", {}).get("GPU") for w in client.scheduler_info(n_workers=-1)["workers"].values())


def semantic_groups(client: Client, url: str, group: Any, ranges: list, ok: np.ndarray, rank: np.ndarray,
                    name: str, eps: float, n_clusters: int | None, seed: int,
                    so: dict | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Group id per row (kept row; -1 without a valid embedding), similarity to it, and run facts."""
    n_rows, dim = group[name].shape
    group_of = np.full(n_rows, -1, np.int64)
    similarity = np.full(n_rows, np.nan, np.float32)
    info: dict[str, Any] = {"embedding": name, "eps": eps}
    # k-means on a sample (SemDeDup / NeMo's fit on a fraction), on the client's GPU when it has one
    fraction = min(1.0, KMEANS_SAMPLE / max(1, int(ok.sum())))
    sample = np.concatenate(_gather(client, _sample_shard, ranges, url, name, fraction, seed, so))
    if not len(sample):
        return group_of, similarity, {**info, "rows_embedded": 0, "n_clusters": 0, "largest_cluster": 0,
                                      "histogram": np.zeros(len(HIST_EDGES) - 1, np.int64)}
    k = n_clusters or max(1, round(math.sqrt(len(sample) / fraction)))
    centroids = client.scatter(spherical_kmeans(sample, k, seed=seed), broadcast=True)
    labels = np.concatenate(_gather(client, _assign_shard, ranges, url, name, centroids, so))
    valid = np.flatnonzero(labels >= 0)
    order = valid[np.argsort(labels[valid], kind="stable")]
    cuts = np.flatnonzero(np.diff(labels[order])) + 1
    indexer = [part.tolist() for part in np.split(order, cuts)]
    blocks = [da.from_delayed(dask.delayed(_unit_block)(a, b, url, name, so), shape=(b - a, dim), dtype=np.float32)
              for _, a, b in ranges]
    regrouped = da.shuffle(da.concatenate(blocks), indexer, axis=0).rechunk({1: -1})
    offsets = np.r_[0, np.cumsum(regrouped.chunks[0])]
    gpu = gpu_workers(client)
    tasks = [dask.delayed(semantic_block)(blk, order[lo:hi], labels[order[lo:hi]], rank[order[lo:hi]], eps,
                                          "cuda" if gpu else None)
             for blk, lo, hi in zip(regrouped.to_delayed().ravel(), offsets[:-1], offsets[1:], strict=True)]
    results = client.gather(client.compute(tasks, resources={"GPU": 1} if gpu else None))
    group_of[valid] = valid
    for r in results:
        group_of[r["member"]] = r["root"]
        similarity[r["member"]] = r["similarity"]
    return group_of, similarity, {**info, "rows_embedded": len(valid), "n_clusters": int(k),
                                  "clusters_used": len(indexer),
                                  "largest_cluster": max(r["largest_cluster"] for r in results),
                                  "histogram": np.sum([r["histogram"] for r in results], axis=0)}


# ---------------------------------------------------------------- writing groups and reports


def _write_groups(task: dict) -> dict:
    group = catalog.open_group(task["catalog"], mode="r+", storage_options=task["storage_options"], check=False)
    catalog.write_arrays(group, task["start"], task["stop"], task["columns"])
    return {"shard": task["shard"], "rows": task["stop"] - task["start"]}


def _read_columns(url: str, rows: np.ndarray, names: list[str], so: dict | None) -> dict[str, np.ndarray]:
    """Values of a few arrays at ``rows`` (one orthogonal read per array)."""
    group = catalog.open_group(url, storage_options=so, check=False)
    unique, inverse = np.unique(rows, return_inverse=True)
    out = {}
    for name in names:
        values = group[name].get_orthogonal_selection((unique,)) if len(unique) else np.zeros(0, object)
        out[name] = np.asarray(values)[inverse] if len(rows) else np.zeros(0, object)
    return out


def _pairs_table(url: str, method: str, group_of: np.ndarray, phash: np.ndarray | None,
                 similarity: np.ndarray | None, so: dict | None) -> pd.DataFrame:
    """Every duplicate row (row_b) paired with its group's kept row (row_a)."""
    rows = np.flatnonzero((group_of >= 0) & (group_of != np.arange(len(group_of))))
    kept = group_of[rows]
    cols = _read_columns(url, np.r_[kept, rows], ["image_id", "source"], so)
    n = len(rows)
    distance = np.zeros(n, np.float64)
    sim = np.full(n, np.nan, np.float32)
    if method == "near":
        distance = imagehash.hamming(phash[kept], phash[rows]).astype(np.float64)
    elif method == "semantic":
        sim = similarity[rows]
        distance = 1.0 - sim.astype(np.float64)
    ids, sources = cols["image_id"].astype(object), cols["source"].astype(object)
    return pd.DataFrame({"row_a": kept, "row_b": rows, "image_id_a": ids[:n], "image_id_b": ids[n:],
                         "source_a": sources[:n], "source_b": sources[n:], "method": method, "distance": distance,
                         "similarity": sim})


def dedup(
    url: str,
    *,
    methods: str | tuple[str, ...] | list[str] = ("exact", "near"),
    near_threshold: int = DEFAULT_NEAR_THRESHOLD,
    near_similarity: float | None = DEFAULT_NEAR_SIMILARITY,
    bands: int | None = None,
    embedding: str | None = None,
    eps: float = DEFAULT_EPS,
    n_clusters: int | None = None,
    seed: int = 0,
    client: Client | None = None,
    storage_options: dict | None = None,
    progress: bool = True,
) -> DedupReport:
    """Find duplicate groups with each method, write ``dup_<method>`` and ``dup_keep``, and the report tables.

    ``near_threshold``: the largest Hamming distance (of 64 bits) between near duplicates; ``near_similarity``:
    the least correlation of their DCT profiles (``imagehash.dct_profiles``; None or 0: pHash bits alone, as
    imagededup; flat images have no profile and are then never near duplicates); ``bands``: how many
    bands the pHash is cut into (default: chosen from the number of unique hashes, always > threshold);
    ``embedding``: the ``emb__<model>`` array (or model id) for ``semantic`` (default: the only one);
    ``eps``: rows with cosine similarity > 1 - eps are semantic duplicates; ``n_clusters``: k-means clusters
    (default sqrt of the rows embedded). The hash pass resumes from its markers; the grouping is recomputed.
    """
    with _quiet_shuffle_log():
        return _dedup(url, methods=methods, near_threshold=near_threshold, near_similarity=near_similarity or None,
                      bands=bands, embedding=embedding, eps=eps,
                      n_clusters=n_clusters, seed=seed, client=client, storage_options=storage_options,
                      progress=progress)


def _dedup(url: str, *, methods: Any, near_threshold: int, near_similarity: float | None, bands: int | None,
           embedding: str | None, eps: float,
           n_clusters: int | None, seed: int, client: Client | None, storage_options: dict | None,
           progress: bool) -> DedupReport:
    started = time.perf_counter()
    so = storage_options
    chosen = _methods(methods)
    if not 0 < eps < 2:
        raise InputError(f"eps {eps}: must be between 0 and 2 (cosine similarity > 1 - eps)")
    if not 0 <= near_threshold < 64:
        raise InputError(f"near threshold {near_threshold}: must be between 0 and 63 bits")
    if near_similarity is not None and not 0 < near_similarity <= 1:
        raise InputError(f"near similarity {near_similarity}: must be between 0 and 1 (a correlation)")
    if bands is not None and not near_threshold < bands <= 64:
        raise InputError(f"near bands {bands}: must be more than the threshold ({near_threshold}) and at most 64, "
                         "or the pigeonhole guarantee is lost")
    client = _client(client)
    group = catalog.open_group(url, mode="r+", storage_options=so)
    n_rows = catalog.n_rows_of(group)
    if not n_rows:
        raise CatalogError(f"{url}: the catalog has no rows to deduplicate")
    name = embedding_name(group, embedding) if "semantic" in chosen else None
    hash_report = hash_images(url, client=client, storage_options=so, progress=progress)
    ranges = _ranges(group)
    parts = _gather(client, _row_info, ranges, url, "near" in chosen, so)
    info = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    ok = info["ok"]
    order, rank = rank_order(ok, info["labelled"], info["area"])
    group_of: dict[str, np.ndarray] = {}
    facts: dict[str, dict] = {}
    similarity = None
    if "exact" in chosen:
        labels, facts["exact"] = exact_groups(client, url, ranges, n_rows, ok, so)
        group_of["exact"] = kept_rows(labels, order, rank)
    if "near" in chosen:
        labels, facts["near"] = near_groups(client, url, ranges, ok, info["phash"], near_threshold, bands,
                                                near_similarity, so)
        group_of["near"] = kept_rows(labels, order, rank)
    if "semantic" in chosen:
        group_of["semantic"], similarity, facts["semantic"] = semantic_groups(
            client, url, group, ranges, ok, rank, name, eps, n_clusters, seed, so)
    # dup_keep: one row per group of the union of every method's groups
    a = np.concatenate([np.flatnonzero(g >= 0) for g in group_of.values()])
    b = np.concatenate([g[g >= 0] for g in group_of.values()])
    keep = (kept_rows(components(n_rows, a, b, ok), order, rank) == np.arange(n_rows)) & ok
    params = {"methods": list(chosen), "near_threshold": near_threshold, "near_similarity": near_similarity,
              "bands": facts.get("near", {}).get("bands"),
              "embedding": name, "eps": eps, "n_clusters": facts.get("semantic", {}).get("n_clusters"),
              "seed": seed, "keep_rule": KEEP_RULE}
    _write_groups_and_keep(client, url, group, ranges, group_of, keep, params, so, progress)
    per_method = {}
    for method, g in group_of.items():
        pairs = _pairs_table(url, method, g, info.get("phash"), similarity, so)
        cross = pairs[pairs["source_a"] != pairs["source_b"]].reset_index(drop=True)
        write_report(url, f"{method}_pairs", pairs, storage_options=so)
        write_report(url, f"{method}_cross_source", cross, storage_options=so)
        per_method[method] = {**_summary(g), "cross_source_pairs": len(cross),
                              **{k: v for k, v in facts[method].items() if k != "histogram"}}
    if "semantic" in facts:
        write_report(url, "semantic_similarity_histogram", histogram_table(facts["semantic"]["histogram"]),
                     storage_options=so)
    catalog.record_stage(group, STAGE, params)
    return DedupReport(url, chosen, n_rows, int(ok.sum()), hash_report, per_method, int(keep.sum()),
                       time.perf_counter() - started)


def _write_groups_and_keep(client: Client, url: str, group: Any, ranges: list, group_of: dict[str, np.ndarray],
                           keep: np.ndarray, params: dict, so: dict | None, progress: bool) -> None:
    """Create the output arrays on the client, then write them one task per shard."""
    attrs = {
        "exact": {"description": "dedup group (row of the kept row) by pixel hash; -1 without image"},
        "near": {"description": "dedup group (row of the kept row) by pHash Hamming distance and DCT profile "
                                "correlation; -1 without image",
                 "threshold": params["near_threshold"], "similarity": params["near_similarity"],
                 "bands": params["bands"]},
        "semantic": {"description": "dedup group (row of the kept row) by SemDeDup on an embedding; -1 without "
                                    "image or embedding", "embedding": params["embedding"], "eps": params["eps"],
                     "n_clusters": params["n_clusters"]},
    }
    for method in group_of:
        catalog.ensure_array(group, GROUP[method], dtype="int64", fill=-1,
                             attrs={**attrs[method], "keep_rule": KEEP_RULE})
    catalog.ensure_array(group, KEEP, dtype="bool", fill=False, attrs={
        "description": "keep this row: one per group of the union of the methods' groups",
        "methods": params["methods"], "keep_rule": KEEP_RULE})
    columns = {GROUP[m]: g for m, g in group_of.items()} | {KEEP: keep}
    tasks = [{"shard": s, "start": lo, "stop": hi, "catalog": url, "storage_options": so,
              "columns": {k: v[lo:hi] for k, v in columns.items()}} for s, lo, hi in ranges]
    run = run_shards(client, _write_groups, tasks, desc="dedup_write", show=progress)
    if run.failures:
        raise StageError(f"{len(run.failures)} shard(s) of the dedup groups failed to write; rerun dedup: "
                         + "; ".join(f"shard {t['shard']}: {m}" for t, m in run.failures))


def histogram_table(counts: np.ndarray) -> pd.DataFrame:
    """Bins of each row's highest cosine similarity within its cluster; ``rows_at_or_above`` is how many rows
    a threshold at ``bin_low`` (eps = 1 - bin_low) would mark as having a duplicate."""
    counts = np.asarray(counts, np.int64)
    return pd.DataFrame({"bin_low": HIST_EDGES[:-1], "bin_high": HIST_EDGES[1:], "rows": counts,
                         "rows_at_or_above": np.cumsum(counts[::-1])[::-1], "eps": 1.0 - HIST_EDGES[:-1]})


# ---------------------------------------------------------------- reports


def _methods_with_reports(url: str, method: str | None, so: dict | None) -> list[str]:
    if method is not None:
        return list(_methods(method))
    fs, path = report_path(url, "x", storage_options=so)
    try:
        names = {p.rsplit("/", 1)[-1] for p in fs.ls(path.rsplit("/", 1)[0], detail=False)}
    except FileNotFoundError:
        names = set()
    found = [m for m in METHODS if f"{m}_pairs.parquet" in names]
    if not found:
        raise CatalogError(f"{url}: no dedup reports (run pzscale dedup first)")
    return found


def duplicate_pairs(url: str, *, method: str | None = None, storage_options: dict | None = None) -> pd.DataFrame:
    """Every duplicate row paired with the kept row of its group, for one method or all methods run.

    Columns: row_a (kept row), row_b, image_id_a, image_id_b, source_a, source_b, method, distance (Hamming
    bits for near, 0 for exact, 1 - cosine for semantic), similarity (cosine, semantic only).
    """
    tables = [read_report(url, f"{m}_pairs", storage_options=storage_options)
              for m in _methods_with_reports(url, method, storage_options)]
    return pd.concat(tables, ignore_index=True)


def cross_source_pairs(url: str, *, method: str | None = None, storage_options: dict | None = None) -> pd.DataFrame:
    """The duplicate pairs whose two rows come from different sources (same columns as ``duplicate_pairs``)."""
    tables = [read_report(url, f"{m}_cross_source", storage_options=storage_options)
              for m in _methods_with_reports(url, method, storage_options)]
    return pd.concat(tables, ignore_index=True)


def similarity_histogram(url: str, *, storage_options: dict | None = None) -> pd.DataFrame:
    """The semantic run's histogram of each row's highest similarity within its cluster (to choose eps)."""
    return read_report(url, "semantic_similarity_histogram", storage_options=storage_options)


def leakage_report(url: str, *, method: str | None = None, storage_options: dict | None = None) -> pd.DataFrame:
    """Duplicates that sit in different splits (train/val/test/unseen), from the catalog's current ``split``.

    For every group and every split it touches, the split's representative is its lowest row; each row is
    paired with the representative of every *earlier* split of its group (order train, val, test, unseen), so
    a test image with a copy in train is listed once with that copy. Columns: row_a, row_b, image_id_a/b,
    source_a/b, split_a, split_b, method, distance (Hamming for near, 0 for exact, NaN for semantic).
    Also written to ``_pzscale/reports/dedup/<method>_leakage.parquet``.
    """
    so = storage_options
    group = catalog.open_group(url, storage_options=so, check=False)
    if "split" not in set(group.array_keys()):
        raise CatalogError(f"{url}: no split array (run `pzscale split` first)")
    tables = []
    for m in _methods_with_reports(url, method, so):
        pairs = read_report(url, f"{m}_pairs", storage_options=so)
        members = pd.DataFrame({"group": np.r_[pairs["row_a"], pairs["row_a"]],
                                "row": np.r_[pairs["row_a"], pairs["row_b"]]}).drop_duplicates()
        cols = _read_columns(url, members["row"].to_numpy(np.int64), ["split", "image_id", "source"]
                             + (["phash"] if m == "near" else []), so)
        members = members.assign(split=cols["split"].astype(object), image_id=cols["image_id"].astype(object),
                                 source=cols["source"].astype(object), rank=0)
        if m == "near":
            members["phash"] = cols["phash"].astype(np.uint64)
        members = members[members["split"].isin(SPLITS)]
        members["rank"] = members["split"].map({s: i for i, s in enumerate(SPLITS)})
        reps = members.sort_values("row").drop_duplicates(["group", "split"])
        joined = members.merge(reps, on="group", suffixes=("_b", "_a"))
        joined = joined[joined["rank_a"] < joined["rank_b"]]
        distance = (imagehash.hamming(joined["phash_a"].to_numpy(np.uint64), joined["phash_b"].to_numpy(np.uint64))
                    .astype(np.float64) if m == "near" else np.zeros(len(joined)) if m == "exact"
                    else np.full(len(joined), np.nan))
        table = pd.DataFrame({f"{col}_{end}": joined[f"{col}_{end}"].to_numpy()
                              for col in ("row", "image_id", "source", "split") for end in "ab"})
        table = table.assign(method=m, distance=distance)
        table = table.sort_values(["row_b", "row_a"]).reset_index(drop=True)
        write_report(url, f"{m}_leakage", table, storage_options=so)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)
