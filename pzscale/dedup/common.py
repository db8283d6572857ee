"""Names, defaults and limits shared by the dedup modules, and the method list parser."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from pzscale.errors import InputError
from pzscale.schema import DUPLICATE_KEEP, DUPLICATE_METHODS, duplicate_name

METHODS = DUPLICATE_METHODS
HASH_STAGE = "dedup_hash"
STAGE = "dedup"
PIXEL_HASH, PHASH, PHASH_PROFILE, KEEP = "pixel_hash", "phash", "phash_profile", DUPLICATE_KEEP
HASH_ARRAYS = (PIXEL_HASH, PHASH, PHASH_PROFILE)  # what the hash pass writes (a marker lists them)
GROUP = {m: duplicate_name(m) for m in METHODS}
REPORTS = "reports/dedup"  # under the catalog's private prefix
# Practitioners use 5-10 bits of 64 (imagededup's default is 10). 8, because at 10 two
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
KMEANS_SAMPLE = 100_000  # the client-side fit's sample (``spherical_kmeans``; the benchmark's comparison)
KMEANS_ITERS = 25  # at most this many centroid updates
KMEANS_TOL = 1e-3  # stop once at most this fraction of the rows changed cluster in a pass
KMEANS_INIT_SAMPLE = 20_000  # rows for k-means++ seeding (at least 8 per cluster)
KMEANS_TASKS_PER_WORKER = 4  # shards are grouped into about this many tasks per worker and pass
KMEANS_CACHE_FRACTION = 0.25  # keep the embeddings in worker memory (float16) when they take at most this
# fraction of the workers' memory limits together; otherwise every pass re-reads them from the catalog
KMEANS_FAR = 32  # farthest rows kept per pass to re-seed empty clusters
HIST_EDGES = np.r_[-1.0, np.linspace(0.5, 1.0, 101)]


@contextmanager
def quiet_shuffle_log() -> Iterator[None]:
    """distributed logs every P2P shuffle's start and end at WARNING; a local scheduler would print them all."""
    log = logging.getLogger("distributed.shuffle._scheduler_plugin")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def parse_methods(methods: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    items = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    unknown = sorted(set(items) - set(METHODS))
    if unknown or not items:
        raise InputError(f"dedup methods {items or methods!r}: choose among {', '.join(METHODS)}")
    return tuple(m for m in METHODS if m in items)
