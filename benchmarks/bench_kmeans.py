"""k-means for semantic dedup (SemDeDup's clustering step): pzscale's torch Lloyd iterations on the
unit sphere against scikit-learn's KMeans (the CPU peer) on the same L2-normalised vectors.

Vectors are random unit vectors with planted clusters (ViT-B/16 width, 512). On a GPU machine
run with ``--device cuda``: the figure the projection uses for the semantic stage's clustering.
Writes ``benchmarks/results/kmeans--<host>--<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from common import machine, save, stats

from pzscale.dedup import spherical_kmeans


def vectors(n: int, dim: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)).astype(np.float32)
    x = centres[rng.integers(0, k, n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=316)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-peer", action="store_true", help="skip scikit-learn (slow at large n)")
    args = parser.parse_args()
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
