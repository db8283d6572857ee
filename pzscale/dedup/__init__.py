"""The dedup stage: exact, near (perceptual hash) and semantic duplicate groups over a catalog, with reports.

Modules: ``hashing`` (phase 1), ``exact``, ``near``, ``semantic`` (phases 2-4), ``graph`` (components and the
keep rule), ``reports`` (the tables), ``run`` (the stage), ``common`` (names and defaults). Every shard read
and write goes through ``pzscale.stage`` (``run_stage``, ``map_shards``, ``retry``); a limit such as ``TILE``
is read by the module that uses it (patch ``pzscale.dedup.near.TILE``).

Phases, each on the Dask cluster:

1. **Hash pass** (stage ``dedup_hash``, one task per shard, resumable and incremental after an append): decode
   every image once and store ``pixel_hash`` (blake2b-128 of the decoded pixels, dtype and shape, as two uint64:
   re-encoded copies match, see ``imagehash``), ``phash`` (64-bit pHash, bit-compatible with imagededup) and
   ``phash_profile`` (the pHash's 63 DCT coefficients as a unit vector, float16).
2. **Exact**: a dask.dataframe of (row, pixel hash) shuffled on the hash; each run of equal hashes is a group.
3. **Near**: identical pHashes are collapsed first (so a bucket of blank frames is one node, not n^2 pairs), then
   the 64 bits are cut into ``bands`` bands, and a *key* is a combination of ``bands - threshold`` of them. Two
   hashes within Hamming distance ``threshold`` differ in at most ``threshold`` bands, so they agree on at least
   one key (pigeonhole; with ``bands = threshold + 1`` a key is a single band, the classic scheme). Every worker
   gets the unique hashes once (8 bytes each) and a task searches a group of keys: per key, one counting pass
   drops the hashes alone in their bucket and one sort groups the rest by key value; within each bucket the
   pairs are verified by Hamming distance and each pair is kept only in the first key it agrees on, so it is
   emitted once. Buckets of up to ``SMALL_BUCKET`` hashes are verified together, vectorised across buckets;
   larger ones in tiles of ``TILE`` x ``TILE`` hashes, and above ``BIG_BUCKET`` their links are reduced to a
   spanning forest as they go, so memory stays bounded. A bucket's time is still quadratic in its size
   (look-alike images make full buckets), and the report gives the largest bucket and the pairs compared.
   ``bands=None`` picks the number of bands with a cost model (hashes grouped per key vs. pairs compared),
   whose pair counts come from the bucket sizes of a 200,000-hash sample of the collection, skew included.
   The rows behind each verified pair of hashes (and rows sharing one hash) are
   then checked on their DCT profiles: a pair is kept if the profiles correlate at ``near_similarity`` (0.97)
   or more, since unrelated ROIs of similar shape and angle often lie within 8 bits (on synth data, pHash bits
   alone give a pair precision of 0.3 at 16k images). Each shard task returns the profiles of its candidate
   rows; the check runs on the client, a few million pairs at a time. Groups are the connected components
   (scipy) of the kept pairs: one int per image on the client, never all pairs.
4. **Semantic** (SemDeDup on a stored ``emb__<model>`` array): spherical k-means on the workers over every
   L2-normalised embedding (``kmeans_on_workers``: k-means++ on a seeded sample, then Lloyd passes in which each
   task sums its shards' unit vectors per nearest centroid in torch, on the GPU where a worker has one, and the
   client adds k x D sums; each task's vectors stay cached in its worker between passes when they fit), the rows
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

from pzscale.dedup.common import (
    BIG_BUCKET,
    DEFAULT_EPS,
    DEFAULT_NEAR_SIMILARITY,
    DEFAULT_NEAR_THRESHOLD,
    GROUP,
    HASH_ARRAYS,
    HASH_STAGE,
    KEEP,
    KEEP_RULE,
    METHODS,
    PHASH,
    PHASH_PROFILE,
    PIXEL_HASH,
    SPLITS,
    STAGE,
)
from pzscale.dedup.graph import components, kept_rows, rank_order
from pzscale.dedup.hashing import hash_images, hash_shard
from pzscale.dedup.near import (
    BandSpec,
    bucket_pairs,
    choose_bands,
    near_groups,
    near_pairs,
    search,
    similar_row_pairs,
)
from pzscale.dedup.reports import (
    cross_source_pairs,
    duplicate_pairs,
    histogram_table,
    leakage_report,
    read_report,
    similarity_histogram,
    write_report,
)
from pzscale.dedup.run import DedupReport, dedup
from pzscale.dedup.semantic import kmeans_on_workers, semantic_block, semantic_groups, spherical_kmeans

__all__ = [
    "BIG_BUCKET", "DEFAULT_EPS", "DEFAULT_NEAR_SIMILARITY", "DEFAULT_NEAR_THRESHOLD", "GROUP", "HASH_ARRAYS",
    "HASH_STAGE", "KEEP", "KEEP_RULE", "METHODS", "PHASH", "PHASH_PROFILE", "PIXEL_HASH", "SPLITS", "STAGE",
    "BandSpec", "DedupReport", "bucket_pairs", "choose_bands", "components", "cross_source_pairs",
    "dedup", "duplicate_pairs", "hash_images", "hash_shard", "histogram_table", "kept_rows", "kmeans_on_workers",
    "leakage_report",
    "near_groups", "near_pairs", "rank_order", "read_report", "search", "semantic_block", "semantic_groups",
    "similar_row_pairs", "similarity_histogram", "spherical_kmeans", "write_report",
]
