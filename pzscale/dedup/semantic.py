"""Semantic duplicates (SemDeDup on a stored ``emb__<model>`` array): spherical k-means on a sample, rows
assigned per shard, regrouped by cluster with a Dask array shuffle, compared within clusters in tiles."""

from __future__ import annotations

import math
from typing import Any

import dask
import dask.array as da
import numpy as np
from distributed import Client

from pzscale.dedup.common import HIST_EDGES, KMEANS_ITERS, KMEANS_SAMPLE, TILE
from pzscale.dedup.graph import components, spanning_forest
from pzscale.errors import CatalogError
from pzscale.schema import STATUS_OK, embedding_arrays
from pzscale.schema import embedding_name as schema_embedding_name
from pzscale.stage import Catalog, map_shards, retry


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


def _sample_shard(cat: Catalog, start: int, stop: int, name: str, fraction: float, seed: int) -> np.ndarray:
    emb, valid = _unit_rows(cat, start, stop, name)
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


def _assign_shard(cat: Catalog, start: int, stop: int, name: str, centroids: np.ndarray) -> np.ndarray:
    emb, valid = _unit_rows(cat, start, stop, name)
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
    # k-means on a sample (SemDeDup / NeMo's fit on a fraction), on the client's GPU when it has one
    fraction = min(1.0, KMEANS_SAMPLE / max(1, int(ok.sum())))
    sample = np.concatenate(map_shards(_sample_shard, cat, name, fraction, seed, client=client))
    if not len(sample):
        return group_of, similarity, {**info, "rows_embedded": 0, "n_clusters": 0, "largest_cluster": 0,
                                      "histogram": np.zeros(len(HIST_EDGES) - 1, np.int64)}
    k = n_clusters or max(1, round(math.sqrt(len(sample) / fraction)))
    centroids = spherical_kmeans(sample, k, seed=seed)
    labels = np.concatenate(map_shards(_assign_shard, cat, name, centroids, client=client))
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
                                  "largest_cluster": max(r["largest_cluster"] for r in results),
                                  "histogram": np.sum([r["histogram"] for r in results], axis=0)}
