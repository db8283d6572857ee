"""k-means for semantic dedup (SemDeDup's clustering step): pzscale's torch Lloyd iterations on the
unit sphere against scikit-learn's KMeans (the CPU peer) on the same L2-normalised vectors.

Vectors are random unit vectors with planted clusters (ViT-B/16 width, 512). On a GPU machine
run with ``--device cuda``: the figure the projection uses for the semantic stage's clustering.

``--distributed``: the stage's own k-means, ``pzscale.dedup.semantic.kmeans_on_workers``, over every
row of a synthetic catalog (``--n`` rows of float16 embeddings, as ``pzscale embed`` stores them; made
once under ``benchmarks/data/``) on a ``pzscale.cluster.connect`` cluster of ``--workers`` workers:
seconds per pass, total, peak RSS per worker, with the embeddings cached in worker memory and
(``--reread-iters``) re-read from the catalog every pass; beside it the client-side fit the stage used
before 2026-12-03 (``spherical_kmeans`` on a ``KMEANS_SAMPLE`` sample gathered to the client).

Writes ``benchmarks/results/kmeans--<host>--<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
from common import DATA, WorkerMemory, cluster, machine, save, stats

from pzscale.dedup import spherical_kmeans


def vectors(n: int, dim: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)).astype(np.float32)
    x = centres[rng.integers(0, k, n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def planted_shard(start: int, stop: int, dim: int, k: int, seed: int = 0, *, vectors: bool = True
                  ) -> tuple[np.ndarray | None, np.ndarray]:
    """Rows [start, stop) of the synthetic catalog and their planted clusters (the same centres for every
    shard); ``vectors=False``: the clusters only."""
    rng = np.random.default_rng([seed, start])
    truth = rng.integers(0, k, stop - start)
    if not vectors:
        return None, truth
    centres = np.random.default_rng(seed).normal(size=(k, dim)).astype(np.float32)
    return centres[truth] + 0.5 * rng.normal(size=(stop - start, dim)).astype(np.float32), truth


def synthetic_catalog(n: int, dim: int, k: int, shard_len: int) -> str:
    """A catalog of ``n`` rows (status ok) with ``emb__bench`` float16 embeddings; made once, then reused."""
    from pzscale import catalog

    url = str(DATA / f"kmeans-{n}x{dim}-k{k}-s{shard_len}.zarr")
    if catalog.exists(url):
        return url
    start = time.perf_counter()
    group = catalog.create(url, n_rows=n, shard_len=shard_len)
    catalog.ensure_array(group, "emb__bench", dtype="float16", fill=np.nan, trailing=(dim,), dims=("bench__dim",))
    for _, a, b in catalog.shard_ranges(0, n, shard_len):
        emb, _ = planted_shard(a, b, dim, k)
        catalog.write_arrays(group, a, b, {"emb__bench": emb.astype(np.float16),
                                           "status": np.full(b - a, "ok", dtype=object)})
    print(f"made {url} in {time.perf_counter() - start:.0f} s")
    return url


def distributed(args: argparse.Namespace) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from pzscale.dedup.common import KMEANS_SAMPLE
    from pzscale.dedup.semantic import _sample_group, kmeans_on_workers
    from pzscale.stage import Catalog

    url = synthetic_catalog(args.n, args.dim, args.k, args.shard_len)
    cat = Catalog.open(url)
    truth = np.concatenate([planted_shard(a, b, args.dim, args.k, vectors=False)[1] for _, a, b in cat.shards()])
    res: dict = {"catalog": url, "shards": len(cat.shards())}
    with cluster(args.workers) as client:
        memory = WorkerMemory(client)
        memory.start()
        km = kmeans_on_workers(client, cat, "emb__bench", args.k, iters=args.iters, seed=0, cache=True)
        peak = memory.peak()
        passes = km.pass_seconds
        res["workers_cached"] = {**km.facts(), "passes": len(passes),
                                 "seconds_per_pass": stats(passes[1:] or passes), "first_pass_seconds": passes[0],
                                 "peak_rss_per_worker_bytes": peak,
                                 "ari_vs_planted": adjusted_rand_score(truth, km.labels)}
        print(json.dumps({k: v for k, v in res["workers_cached"].items() if k not in ("changed", "pass_seconds")}))
        del km
        if args.reread_iters:
            memory.start()
            km = kmeans_on_workers(client, cat, "emb__bench", args.k, iters=args.reread_iters, tol=0, seed=0,
                                   cache=False)
            res["workers_reread"] = {**km.facts(), "passes": len(km.pass_seconds),
                                     "seconds_per_pass": stats(km.pass_seconds),
                                     "peak_rss_per_worker_bytes": memory.peak()}
            print(json.dumps({k: v for k, v in res["workers_reread"].items() if k != "changed"}))
            del km
        # the stage before 2026-12-03: a KMEANS_SAMPLE sample gathered to the client, fitted there
        start = time.perf_counter()
        per = math.ceil(len(cat.shards()) / (4 * args.workers))
        groups = [tuple((a, b) for _, a, b in cat.shards()[i : i + per]) for i in range(0, len(cat.shards()), per)]
        parts = client.gather(client.map(_sample_group, [(cat, g, "emb__bench") for g in groups],
                                         p=KMEANS_SAMPLE / args.n, seed=0, pure=False))
        sample, rows = np.concatenate([p[2] for p in parts]), np.concatenate([p[1] for p in parts])
        gathered = time.perf_counter() - start
    spherical_kmeans(sample[:1000], 8, iters=2, device=args.device)  # warm-up (torch import, CUDA context)
    start = time.perf_counter()
    centroids = spherical_kmeans(sample, args.k, iters=args.iters, device=args.device)
    fit = time.perf_counter() - start
    labels = np.argmax(sample @ centroids.T, axis=1)
    res["client_sample"] = {"sample": len(sample), "gather_seconds": gathered, "fit_seconds": fit,
                            "seconds_per_iteration": fit / args.iters, "iterations": args.iters,
                            "mean_similarity": float(np.mean(np.max(sample @ centroids.T, axis=1))),
                            "ari_vs_planted_on_sample": adjusted_rand_score(truth[rows], labels)}
    print(json.dumps(res["client_sample"]))
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=316)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-peer", action="store_true", help="skip scikit-learn (slow at large n)")
    parser.add_argument("--distributed", action="store_true", help="kmeans_on_workers over a synthetic catalog")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-len", type=int, default=16_384)
    parser.add_argument("--reread-iters", type=int, default=2, help="passes - 1 of the run that re-reads (0: skip)")
    args = parser.parse_args()
    if args.distributed:
        res = distributed(args)
        cached = res["workers_cached"]
        data = {"metadata": {"machine": machine(args.device), "suite": "kmeans", **vars(args)}, "results": res,
                "summary": [{"stage": "semantic k-means (workers)", "workers": args.workers, "images": args.n,
                             "device": "cpu", "images_per_s": args.n / cached["seconds"],
                             "seconds_per_pass": cached["seconds_per_pass"]["median"]}]}
        print(f"wrote {save('kmeans', data, args.device)}")
        return
    x = vectors(args.n, args.dim, args.k)
    spherical_kmeans(x[:1000], 8, iters=2, device=args.device)  # warm-up (CUDA context, kernels)
    ours = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        spherical_kmeans(x, args.k, iters=args.iters, device=args.device)
        ours.append(args.n / (time.perf_counter() - start))
    res = {"pzscale_vectors_per_s": stats(ours)}
    if not args.no_peer:
        from sklearn.cluster import KMeans

        peer = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            KMeans(args.k, n_init=1, max_iter=args.iters, tol=0, random_state=0).fit(x)
            peer.append(args.n / (time.perf_counter() - start))
        res["sklearn_vectors_per_s"] = stats(peer)
        res["ratio_to_sklearn"] = res["pzscale_vectors_per_s"]["median"] / res["sklearn_vectors_per_s"]["median"]
    data = {"metadata": {"machine": machine(args.device), "suite": "kmeans", **vars(args)}, "results": res,
            "summary": [{"stage": "semantic k-means", "workers": 1, "images": args.n, "device": args.device,
                         "images_per_s": res["pzscale_vectors_per_s"]["median"],
                         "peer_ratio": res.get("ratio_to_sklearn")}]}
    print(json.dumps(res, indent=1))
    print(f"wrote {save('kmeans', data, args.device)}")


if __name__ == "__main__":
    main()
