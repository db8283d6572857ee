"""The dedup stage: the hash pass, then exact, near and semantic groups, ``dup_keep``, and the reports."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed import Client

from pzscale.dedup.common import (
    DEFAULT_EPS,
    DEFAULT_NEAR_SIMILARITY,
    DEFAULT_NEAR_THRESHOLD,
    GROUP,
    KEEP,
    KEEP_RULE,
    STAGE,
    parse_methods,
    quiet_shuffle_log,
)
from pzscale.dedup.exact import exact_groups
from pzscale.dedup.graph import components, kept_rows, rank_order, summary
from pzscale.dedup.hashing import hash_images, row_info
from pzscale.dedup.near import near_groups
from pzscale.dedup.reports import histogram_table, pairs_table, write_report
from pzscale.dedup.semantic import embedding_name, semantic_groups
from pzscale.errors import CatalogError, InputError
from pzscale.stage import (
    Catalog,
    ShardResult,
    ShardTask,
    StageReport,
    map_shards,
    require_client,
    run_stage,
)


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


def dedup(
    url: str | Catalog,
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
    with quiet_shuffle_log():
        return _dedup(url, methods=methods, near_threshold=near_threshold, near_similarity=near_similarity or None,
                      bands=bands, embedding=embedding, eps=eps,
                      n_clusters=n_clusters, seed=seed, client=client, storage_options=storage_options,
                      progress=progress)


def _dedup(url: str | Catalog, *, methods: Any, near_threshold: int, near_similarity: float | None, bands: int | None,
           embedding: str | None, eps: float,
           n_clusters: int | None, seed: int, client: Client | None, storage_options: dict | None,
           progress: bool) -> DedupReport:
    started = time.perf_counter()
    chosen = parse_methods(methods)
    if not 0 < eps < 2:
        raise InputError(f"eps {eps}: must be between 0 and 2 (cosine similarity > 1 - eps)")
    if not 0 <= near_threshold < 64:
        raise InputError(f"near threshold {near_threshold}: must be between 0 and 63 bits")
    if near_similarity is not None and not 0 < near_similarity <= 1:
        raise InputError(f"near similarity {near_similarity}: must be between 0 and 1 (a correlation)")
    if bands is not None and not near_threshold < bands <= 64:
        raise InputError(f"near bands {bands}: must be more than the threshold ({near_threshold}) and at most 64, "
                         "or the pigeonhole guarantee is lost")
    client = require_client(client)
    cat = Catalog.open(url, storage_options)
    url, n_rows = cat.url, cat.n_rows
    if not n_rows:
        raise CatalogError(f"{url}: the catalog has no rows to deduplicate")
    name = embedding_name(cat.arrays(), embedding) if "semantic" in chosen else None
    hash_report = hash_images(cat, client=client, progress=progress)
    parts = map_shards(row_info, cat, "near" in chosen, client=client)
    info = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    ok = info["ok"]
    order, rank = rank_order(ok, info["labelled"], info["area"])
    group_of: dict[str, np.ndarray] = {}
    facts: dict[str, dict] = {}
    similarity = None
    if "exact" in chosen:
        labels, facts["exact"] = exact_groups(client, cat, ok)
        group_of["exact"] = kept_rows(labels, order, rank)
    if "near" in chosen:
        labels, facts["near"] = near_groups(client, cat, ok, info["phash"], near_threshold, bands, near_similarity)
        group_of["near"] = kept_rows(labels, order, rank)
    if "semantic" in chosen:
        group_of["semantic"], similarity, facts["semantic"] = semantic_groups(
            client, cat, ok, rank, name, eps, n_clusters, seed)
    # dup_keep: one row per group of the union of every method's groups
    a = np.concatenate([np.flatnonzero(g >= 0) for g in group_of.values()])
    b = np.concatenate([g[g >= 0] for g in group_of.values()])
    keep = (kept_rows(components(n_rows, a, b, ok), order, rank) == np.arange(n_rows)) & ok
    params = {"methods": list(chosen), "near_threshold": near_threshold, "near_similarity": near_similarity,
              "bands": facts.get("near", {}).get("bands"),
              "embedding": name, "eps": eps, "n_clusters": facts.get("semantic", {}).get("n_clusters"),
              "seed": seed, "keep_rule": KEEP_RULE}
    _write_groups_and_keep(client, cat, group_of, keep, params, progress)
    per_method = {}
    for method, g in group_of.items():
        pairs = pairs_table(cat, method, g, info.get("phash"), similarity)
        cross = pairs[pairs["source_a"] != pairs["source_b"]].reset_index(drop=True)
        write_report(url, f"{method}_pairs", pairs, storage_options=cat.options)
        write_report(url, f"{method}_cross_source", cross, storage_options=cat.options)
        per_method[method] = {**summary(g), "cross_source_pairs": len(cross),
                              **{k: v for k, v in facts[method].items() if k != "histogram"}}
    if "semantic" in facts:
        write_report(url, "semantic_similarity_histogram", histogram_table(facts["semantic"]["histogram"]),
                     storage_options=cat.options)
    cat.record_stage(STAGE, params)
    return DedupReport(url, chosen, n_rows, int(ok.sum()), hash_report, per_method, int(keep.sum()),
                       time.perf_counter() - started)


def _write_groups(task: ShardTask) -> ShardResult:
    task.catalog.write(task.start, task.stop, task.params["columns"])
    return ShardResult(task.stop - task.start)  # no marker: the grouping is recomputed on every run


def _write_groups_and_keep(client: Client, cat: Catalog, group_of: dict[str, np.ndarray], keep: np.ndarray,
                           params: dict, progress: bool) -> None:
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
        cat.ensure_array(GROUP[method], dtype="int64", fill=-1, attrs={**attrs[method], "keep_rule": KEEP_RULE})
    cat.ensure_array(KEEP, dtype="bool", fill=False, attrs={
        "description": "keep this row: one per group of the union of the methods' groups",
        "methods": params["methods"], "keep_rule": KEEP_RULE})
    columns = {GROUP[m]: g for m, g in group_of.items()} | {KEEP: keep}
    tasks = [ShardTask(cat, STAGE, s, lo, hi, lo, {"columns": {k: v[lo:hi] for k, v in columns.items()}})
             for s, lo, hi in cat.shards()]
    run_stage(STAGE, _write_groups, tasks, catalog=cat, client=client, progress_bar=progress)
