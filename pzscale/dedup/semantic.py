"""Semantic duplicates (SemDeDup on a stored ``emb__<model>`` array): spherical k-means over every row on the
workers (``kmeans_on_workers``), regrouped by cluster with a Dask array shuffle, compared within clusters in tiles."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
from distributed import Client

from pzscale.dedup.common import (
    HIST_EDGES,
    KMEANS_CACHE_FRACTION,
    KMEANS_FAR,
    KMEANS_INIT_SAMPLE,
    KMEANS_ITERS,
    KMEANS_TASKS_PER_WORKER,
    KMEANS_TOL,
    TILE,
)
from pzscale.dedup.graph import components, spanning_forest
from pzscale.errors import CatalogError
from pzscale.schema import STATUS_OK, embedding_arrays
from pzscale.schema import embedding_name as schema_embedding_name
from pzscale.stage import Catalog, retry


def embedding_name(arrays: list[str], embedding: str | None) -> str:
    """The ``emb__<model>`` array to use among ``arrays``: the one given (array name or model id), or the only
    one there is."""
    present = embedding_arrays(arrays)
    if embedding is None:
        if len(present) == 1:
            return present[0]
        if not present:
            raise CatalogError("semantic dedup needs an embedding array emb__<model> in the catalog; "
                               "run `pzscale embed` first")
        raise CatalogError(f"several embedding arrays {present}: choose one with embedding=")
    name = schema_embedding_name(embedding)
    if name not in present:
        raise CatalogError(f"no embedding array {name} in the catalog (present: {present or 'none'})")
    return name


def _unit_rows(cat: Catalog, start: int, stop: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised float32 embeddings of rows [start, stop) (zeros where invalid) and the valid mask."""
    cols = cat.read(start, stop, [name, "status"])
    emb = cols[name].astype(np.float32)
    norm = np.linalg.norm(emb, axis=1)
    valid = (cols["status"] == STATUS_OK) & np.isfinite(norm) & (norm > 0)
    out = np.zeros_like(emb)
    out[valid] = emb[valid] / norm[valid, None]
    return out, valid


def _unit_block(cat: Catalog, start: int, stop: int, name: str) -> np.ndarray:
    return retry(_unit_rows, cat, start, stop, name)[0]


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def spherical_kmeans(sample: np.ndarray, k: int, *, iters: int = KMEANS_ITERS, seed: int = 0,
                     device: str | None = None) -> np.ndarray:
    """Lloyd iterations on the unit sphere (cosine similarity), in torch, in this process; unit centroids (k, D)
    float32. Seeded with k-means++ (as ``kmeans_on_workers``; random rows before 2026-12-03).

    Empty clusters are re-seeded with the points farthest from their centroid.
    """
    import torch

    device = device or _device()
    sample = np.ascontiguousarray(sample, np.float32)
    x = torch.from_numpy(sample).to(device)
    k = max(1, min(k, len(x)))
    m = max(KMEANS_INIT_SAMPLE, 8 * k)  # seeds from at most this many rows, as on the workers
    pool = sample if len(sample) <= m else sample[np.random.default_rng(seed).choice(len(sample), m, replace=False)]
    centroids = torch.from_numpy(_kmeans_pp(pool, k, seed)).to(device)
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


# ---------------------------------------------------------------- k-means on the workers


@dataclass
class KMeansResult:
    """What ``kmeans_on_workers`` found and how it ran.

    ``centroids`` (k, D) float32 unit vectors; ``labels`` (n_rows,) int64, each row's nearest centroid
    (-1 without a valid embedding), assigned against ``centroids`` themselves; ``changed``: rows that changed
    cluster in each pass (the first pass counts every row); ``pass_seconds``: wall time of each pass.
    """

    centroids: np.ndarray
    labels: np.ndarray
    k: int
    n_valid: int
    iterations: int
    converged: bool
    cached: bool
    tasks_per_pass: int
    changed: list[int] = field(default_factory=list)
    pass_seconds: list[float] = field(default_factory=list)
    init_seconds: float = 0.0
    seconds: float = 0.0
    mean_similarity: float = float("nan")

    def facts(self) -> dict[str, Any]:
        """The run facts, JSON-ready (no arrays)."""
        return {"k": self.k, "n_valid": self.n_valid, "iterations": self.iterations, "converged": self.converged,
                "cached": self.cached, "tasks_per_pass": self.tasks_per_pass, "changed": self.changed,
                "pass_seconds": self.pass_seconds, "init_seconds": self.init_seconds, "seconds": self.seconds,
                "mean_similarity": self.mean_similarity}


def _load_group(cat: Catalog, shards: tuple[tuple[int, int], ...], name: str) -> dict[str, Any]:
    """Unit embeddings (float16) of the valid rows of a group of shards, their catalog rows and the shards."""
    xs, rows = [], []
    for start, stop in shards:
        emb, valid = retry(_unit_rows, cat, start, stop, name)
        idx = np.flatnonzero(valid)
        xs.append(emb[idx].astype(np.float16))
        rows.append(idx + start)
    return {"x": np.concatenate(xs), "rows": np.concatenate(rows), "shards": shards}


def _group_block(src: Any) -> dict[str, Any]:
    """A group's block: the cached one, or read now from its (catalog, shards, name)."""
    return _load_group(*src) if isinstance(src, tuple) else src


def _sample_group(src: Any, p: float, seed: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Valid rows of a group, and the rows (and their unit vectors, float32) of a seeded Bernoulli(p) sample.

    A row's draw depends on its shard and the seed only, not on how shards are grouped."""
    block = _group_block(src)
    keep = np.zeros(len(block["rows"]), bool)
    for start, stop in block["shards"]:
        u = np.random.default_rng([seed, start]).random(stop - start)
        lo, hi = np.searchsorted(block["rows"], [start, stop])
        keep[lo:hi] = u[block["rows"][lo:hi] - start] < p
    return len(block["rows"]), block["rows"][keep], block["x"][keep].astype(np.float32)


def _kmeans_pp(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means++ seeds (unit rows of ``x``) under the squared chord distance 2 - 2 cos; seeded."""
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(x)))]
    dist = np.maximum(2 - 2 * (x @ x[chosen[0]]), 0).astype(np.float64)
    for _ in range(1, k):
        total = dist.sum()
        if total > 0:
            i = int(np.searchsorted(np.cumsum(dist), rng.random() * total, side="right"))
            i = min(i, len(x) - 1)
        else:  # every row sits on a seed (fewer distinct rows than k): any row
            i = int(rng.integers(len(x)))
        chosen.append(i)
        dist = np.minimum(dist, np.maximum(2 - 2 * (x @ x[i]), 0))
    return x[chosen].astype(np.float32)


def _kmeans_pass(src: Any, centroids: np.ndarray, prev: dict | None, n_far: int) -> dict[str, Any]:
    """One Lloyd pass over a group on this worker's device: nearest centroid of every row, per-cluster sums of
    unit vectors and counts, rows that changed cluster since ``prev``, and the ``n_far`` rows farthest from
    their centroid (candidates to re-seed empty clusters)."""
    import torch

    block = _group_block(src)
    device = _device()
    c = torch.from_numpy(np.ascontiguousarray(centroids, np.float32)).to(device)
    k = len(c)
    n = len(block["rows"])
    labels = np.empty(n, np.int32)
    best = np.empty(n, np.float32)
    sums = torch.zeros_like(c)
    counts = torch.zeros(k, dtype=torch.int64, device=device)
    step = max(1024, 2**24 // k)  # rows at a time: step x k similarities, 64 MB
    for lo in range(0, n, step):
        x = torch.from_numpy(block["x"][lo : lo + step]).to(device).float()
        b, a = (x @ c.T).max(1)
        sums.index_add_(0, a, x)
        counts += torch.bincount(a, minlength=k)
        labels[lo : lo + step] = a.cpu().numpy()
        best[lo : lo + step] = b.cpu().numpy()
    changed = n if prev is None else int(np.count_nonzero(prev["labels"] != labels))
    far = np.lexsort((block["rows"], best))[:n_far]
    return {"labels": labels, "rows": block["rows"], "sums": sums.cpu().numpy(), "counts": counts.cpu().numpy(),
            "changed": changed, "similarity": float(best.sum(dtype=np.float64)), "n": n,
            "far_x": block["x"][far].astype(np.float32), "far_sim": best[far], "far_row": block["rows"][far]}


def _reduce_passes(*parts: dict, n_far: int) -> dict[str, Any]:
    """Sum partial results (float64 sums), keeping the ``n_far`` farthest rows overall."""
    far_sim = np.concatenate([p["far_sim"] for p in parts])
    far_row = np.concatenate([p["far_row"] for p in parts])
    far = np.lexsort((far_row, far_sim))[:n_far]
    return {"sums": np.sum([p["sums"].astype(np.float64) for p in parts], axis=0),
            "counts": np.sum([p["counts"] for p in parts], axis=0),
            "changed": sum(p["changed"] for p in parts), "similarity": sum(p["similarity"] for p in parts),
            "n": sum(p["n"] for p in parts), "far_x": np.concatenate([p["far_x"] for p in parts])[far],
            "far_sim": far_sim[far], "far_row": far_row[far]}


def _labels_of(result: dict) -> tuple[np.ndarray, np.ndarray]:
    return result["rows"], result["labels"]


def _new_centroids(total: dict, k: int, fallback: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Renormalised cluster sums; an empty cluster is re-seeded with the next row farthest from its centroid
    (as ``spherical_kmeans``), then with random rows of ``fallback`` (the init sample) once those run out."""
    sums = np.array(total["sums"], np.float64)
    empty = np.flatnonzero(np.asarray(total["counts"]) == 0)
    for i, e in enumerate(empty):
        sums[e] = total["far_x"][i] if i < len(total["far_x"]) else fallback[rng.integers(len(fallback))]
    norm = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.where(norm > 0, norm, 1)).astype(np.float32)


def _tree_reduce(client: Client, parts: list, n_far: int, fan_in: int = 8) -> Any:
    """The partial results summed on the workers, ``fan_in`` at a time: the client gets one k x D sum."""
    while len(parts) > 1:
        parts = [client.submit(_reduce_passes, *parts[i : i + fan_in], n_far=n_far, pure=False)
                 for i in range(0, len(parts), fan_in)]
    return parts[0]


def kmeans_on_workers(client: Client, cat: Catalog, name: str, k: int | None = None, *, iters: int = KMEANS_ITERS,
                      tol: float = KMEANS_TOL, seed: int = 0, cache: bool | None = None,
                      shards_per_task: int | None = None) -> KMeansResult:
    """Spherical k-means over every valid row of embedding array ``name``, on the Dask workers.

    The shards are cut into groups (about ``KMEANS_TASKS_PER_WORKER`` per worker, or ``shards_per_task``
    shards each); each pass is one task per group, which assigns the group's rows to the current centroids
    and sums the unit vectors per cluster in torch on the worker's device (CUDA where the worker has it).
    The partial sums are added on the workers (a tree, 8 at a time) and the client renormalises one k x D
    sum, so no embedding travels after loading. With ``cache`` (default: when the float16 unit vectors take
    at most ``KMEANS_CACHE_FRACTION`` of the workers' memory limits) each group's embeddings are read once
    and kept in worker memory as a Dask future (Dask's own memory limits and spilling apply, and the passes
    run where the data is); otherwise every pass re-reads its group from the catalog.

    Seeding: k-means++ on a seeded Bernoulli sample of about ``max(KMEANS_INIT_SAMPLE, 8 k)`` rows. Empty
    clusters are re-seeded with the rows farthest from their centroid. Stops after ``iters`` centroid updates
    or once at most ``tol`` of the rows changed cluster in a pass; the labels returned are assigned against the
    centroids returned. ``k`` defaults to sqrt(valid rows) and is capped at the sample size. Deterministic for
    a seed, a catalog and a number of groups on CPU workers (CUDA sums are not bit-exact).
    """
    t0 = time.perf_counter()
    ranges = cat.shards()
    n_rows, dim = retry(lambda: cat.group()[name].shape)
    labels_out = np.full(n_rows, -1, np.int64)
    workers = client.scheduler_info(n_workers=-1)["workers"]
    per = shards_per_task or max(1, math.ceil(len(ranges) / (KMEANS_TASKS_PER_WORKER * max(1, len(workers)))))
    groups = [tuple((a, b) for _, a, b in ranges[i : i + per]) for i in range(0, len(ranges), per)]
    if cache is None:
        limits = [w.get("memory_limit") or 0 for w in workers.values()]
        cache = not all(limits) or n_rows * dim * 2 <= KMEANS_CACHE_FRACTION * sum(limits)
    if cache:
        sources = client.map(_load_group, [cat] * len(groups), groups, [name] * len(groups), pure=False)
    else:
        sources = [(cat, g, name) for g in groups]
    # seeding: a sample of the rows (from the cached blocks when there are some), k-means++ on the client
    k_guess = k or max(1, round(math.sqrt(n_rows)))
    p = min(1.0, max(KMEANS_INIT_SAMPLE, 8 * k_guess) / max(1, n_rows))
    sampled = client.gather(client.map(_sample_group, sources, p=p, seed=seed, pure=False))
    n_valid = sum(s[0] for s in sampled)
    sample = np.concatenate([s[2] for s in sampled]) if sampled else np.zeros((0, dim), np.float32)
    if n_valid == 0 or not len(sample):
        return KMeansResult(np.zeros((0, dim), np.float32), labels_out, 0, n_valid, 0, True, bool(cache),
                            len(groups), seconds=time.perf_counter() - t0)
    k = max(1, min(k or round(math.sqrt(n_valid)), len(sample)))
    centroids = _kmeans_pp(sample, k, seed)
    rng = np.random.default_rng([seed, 1])
    init_seconds = time.perf_counter() - t0
    n_far = min(KMEANS_FAR, k)
    results: list = [None] * len(groups)
    changed, pass_seconds = [], []
    converged = False
    for it in range(iters + 1):
        start = time.perf_counter()
        shared = client.scatter(centroids, broadcast=True, hash=False)
        results = [client.submit(_kmeans_pass, src, shared, prev, n_far, pure=False)
                   for src, prev in zip(sources, results, strict=True)]
        total = _tree_reduce(client, list(results), n_far).result()
        changed.append(int(total["changed"]))
        pass_seconds.append(time.perf_counter() - start)
        converged = it > 0 and total["changed"] <= tol * n_valid
        if converged or it == iters:
            break
        centroids = _new_centroids(total, k, sample, rng)
    for rows, labels in client.gather(client.map(_labels_of, results, pure=False)):
        labels_out[rows] = labels
    del sources, results
    return KMeansResult(centroids, labels_out, k, n_valid, it, converged, bool(cache), len(groups), changed,
                        pass_seconds, init_seconds, time.perf_counter() - t0, total["similarity"] / max(1, n_valid))


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
                a, b = spanning_forest(np.concatenate(ea), np.concatenate(eb))
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


def semantic_groups(client: Client, cat: Catalog, ok: np.ndarray, rank: np.ndarray, name: str, eps: float,
                    n_clusters: int | None, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Group id per row (kept row; -1 without a valid embedding), similarity to it, and run facts."""
    n_rows, dim = retry(lambda: cat.group()[name].shape)
    group_of = np.full(n_rows, -1, np.int64)
    similarity = np.full(n_rows, np.nan, np.float32)
    info: dict[str, Any] = {"embedding": name, "eps": eps}
    # spherical k-means over every embedded row, on the workers (their GPUs where they have them)
    km = kmeans_on_workers(client, cat, name, n_clusters, seed=seed)
    if not km.n_valid:
        return group_of, similarity, {**info, "rows_embedded": 0, "n_clusters": 0, "largest_cluster": 0,
                                      "histogram": np.zeros(len(HIST_EDGES) - 1, np.int64)}
    k, labels = km.k, km.labels
    valid = np.flatnonzero(labels >= 0)
    order = valid[np.argsort(labels[valid], kind="stable")]
    cuts = np.flatnonzero(np.diff(labels[order])) + 1
    indexer = [part.tolist() for part in np.split(order, cuts)]
    blocks = [da.from_delayed(dask.delayed(_unit_block)(cat, a, b, name), shape=(b - a, dim), dtype=np.float32)
              for _, a, b in cat.shards()]
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
                                  "kmeans_iterations": km.iterations, "kmeans_converged": km.converged,
                                  "largest_cluster": max(r["largest_cluster"] for r in results),
                                  "histogram": np.sum([r["histogram"] for r in results], axis=0)}
