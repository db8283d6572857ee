"""Near-duplicate search: pzscale's banded pHash search against imagededup, side by side in one run.

- **scaling**: pzscale's candidate generation (``dedup.near_pairs``: collapse identical hashes, band records,
  Dask shuffle, verify, each pair once) on N and 4N pHashes, on a LocalCluster of 2 worker processes. The
  hashes are real pHashes of synthetic plankton images (``pzscale synth``, the 4 rotations of each image, so
  there are enough of them), and, for reference, uniformly random 64-bit values (no look-alikes).
- **peer on encodings**: imagededup's ``PHash().find_duplicates(encoding_map=..., max_distance_threshold=T)``
  (Cython brute force, 2 processes) on the same hashes at the sizes it finishes in the time budget; its time at
  4N is extrapolated as N^2 from its largest measured size (stated as such in the JSON).
- **peer end to end**: imagededup on a folder of PNG files (encode + find) against ``dedup.dedup(methods="near")``
  on a catalog holding the same images (hash pass from the catalog, grouping, writes, reports), with the
  recall of the planted duplicates (truth.json) for both and the share of imagededup's pairs pzscale groups.

Both use the same bits (``imagehash.phash`` equals imagededup's pHash) and the same threshold, so their
pairs agree; pzscale's groups are the transitive closure of those pairs. Writes
``benchmarks/results/dedup--<host>--cpu.json``. Run: ``python benchmarks/bench_dedup.py`` (about 5 minutes on
2 idle cores).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from bench_ingest import HERE, dataset, machine, row_groups
from distributed import Client, LocalCluster
from PIL import Image

from pzscale import dedup, imagehash, images, open_catalog, read_images
from pzscale.ingest import ingest

THRESHOLD = dedup.DEFAULT_NEAR_THRESHOLD


def _rotated_hashes(args: tuple[str, int]) -> np.ndarray:
    """pHashes of every image of a row group and of its 3 rotations: (4, n)."""
    path, rg = args
    column = pq.ParquetFile(path).read_row_group(rg, columns=["image"]).column("image").combine_chunks()
    pixels = []
    for data in column.field("bytes").to_pylist():
        try:
            pixels.append(images.decode(data))
        except Exception:  # noqa: BLE001, S112 - the planted corrupt rows
            continue
    return np.stack([imagehash.phashes([np.ascontiguousarray(np.rot90(p, k)) for p in pixels]) for k in range(4)])


def real_hashes(folder: Path) -> np.ndarray:
    with mp.get_context("spawn").Pool(2) as pool:
        parts = pool.map(_rotated_hashes, row_groups(folder))
    return np.concatenate(parts, axis=1).ravel()


def pzscale_pairs(client: Client, values: np.ndarray) -> dict:
    import dask.dataframe as dd

    parts = max(2, len(values) // 16384)
    spec = dedup.BandSpec(THRESHOLD, dedup.choose_bands(THRESHOLD, len(np.unique(values))))
    frame = dd.from_pandas(pd.DataFrame({"phash": values}), npartitions=parts)
    start = time.perf_counter()
    pairs, stats = dedup.near_pairs(client, frame, spec, parts)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "hashes": len(values), "unique": int(len(np.unique(values))), "bands": spec.bands,
            "keys": spec.n_keys, "links": len(pairs), **stats, "_pairs": pairs}


def imagededup_pairs(values: np.ndarray) -> dict:
    from imagededup.methods import PHash

    encodings = {f"{i}": imagehash.to_hex(v) for i, v in enumerate(values)}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns that num_enc_workers is unused with encodings
        found = PHash(verbose=False).find_duplicates(encoding_map=encodings, max_distance_threshold=THRESHOLD,
                                                     num_dist_workers=2)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "hashes": len(values), "pairs": sum(len(v) for v in found.values()) // 2}


def scaling(client: Client, hashes: np.ndarray, n: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for kind, pool in (("real_phash", hashes), ("uniform_random", None)):
        runs = {}
        for size in (n, 4 * n):
            values = pool[rng.permutation(len(pool))[:size]] if pool is not None else \
                rng.integers(0, 2**63, size, dtype=np.int64).astype(np.uint64) * np.uint64(2)
            res = pzscale_pairs(client, values)
            res.pop("_pairs")
            runs[str(size)] = res
            print(f"  pzscale {kind} {size:,}: {res['seconds']:.1f} s, {res['links']:,} links, "
                  f"{res['pairs_compared']:,} compared, bands {res['bands']}")
        small, large = runs[str(n)], runs[str(4 * n)]
        out[kind] = {"runs": runs, "time_4n_over_n": large["seconds"] / small["seconds"],
                     "compared_4n_over_n": large["pairs_compared"] / max(1, small["pairs_compared"])}
    return out


def peer_on_encodings(client: Client, hashes: np.ndarray, sizes: list[int], target: int, budget: float) -> dict:
    rng = np.random.default_rng(1)
    values = hashes[rng.permutation(len(hashes))]
    rows, spent = [], 0.0
    for size in sizes:
        if spent > budget:
            break
        peer = imagededup_pairs(values[:size])
        spent += peer["seconds"]
        ours = pzscale_pairs(client, values[:size])
        pairs = ours.pop("_pairs")
        # the same bits and threshold: imagededup's pair count is the hash pairs plus identical-hash pairs
        rows.append({"hashes": size, "imagededup_s": peer["seconds"], "pzscale_s": ours["seconds"],
                     "speedup": peer["seconds"] / ours["seconds"], "imagededup_pairs": peer["pairs"],
                     "pzscale_links": len(pairs)})
        print(f"  encodings {size:,}: imagededup {peer['seconds']:.1f} s, pzscale {ours['seconds']:.1f} s")
    fit = np.polyfit(np.log([r["hashes"] for r in rows]), np.log([r["imagededup_s"] for r in rows]), 1) \
        if len(rows) > 1 else None
    ours = pzscale_pairs(client, values[:target])
    ours.pop("_pairs")
    expo = float(fit[0]) if fit is not None else float("nan")
    last = rows[-1]
    # brute force compares every pair: N^2 from its largest measured size (the fit is recorded, not used:
    # on a loaded machine it swings both ways)
    estimate = last["imagededup_s"] * (target / last["hashes"]) ** 2
    return {"measured": rows, "imagededup_growth_exponent": expo, "target_hashes": target,
            "imagededup_s_at_target_extrapolated": estimate, "pzscale_s_at_target_measured": ours["seconds"],
            "speedup_at_target": estimate / ours["seconds"],
            "note": f"imagededup was not run at {target:,} hashes (budget); its time there is extrapolated as N^2 "
                    f"from its largest measured size"}


def end_to_end(client: Client, folder: Path, truth: dict) -> dict:
    with tempfile.TemporaryDirectory(dir=HERE / "data") as tmp:
        url = f"{tmp}/catalog.zarr"
        ingest([str(folder)], url, shard_len=1024, client=client, progress=False)
        ds = open_catalog(url)[["image_id", "status"]].compute()
        ok = np.flatnonzero(ds["status"].values == "ok")
        files = Path(tmp) / "png"
        files.mkdir()
        for row, pixels in zip(ok, read_images(url, ok), strict=True):
            Image.fromarray(pixels).save(files / f"{row}.png")  # lossless: imagededup sees the same pixels
        from imagededup.methods import PHash

        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = PHash(verbose=False).find_duplicates(image_dir=files, max_distance_threshold=THRESHOLD,
                                                         num_enc_workers=2, num_dist_workers=2)
        peer_s = time.perf_counter() - start
        one_worker = f"{tmp}/one-worker.zarr"
        shutil.copytree(url, one_worker)
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as c1, \
                Client(c1) as client1:
            start = time.perf_counter()
            dedup.dedup(one_worker, methods="near", near_threshold=THRESHOLD, client=client1, progress=False)
            one_s = time.perf_counter() - start
        start = time.perf_counter()
        report = dedup.dedup(url, methods="near", near_threshold=THRESHOLD, client=client, progress=False)
        ours_s = time.perf_counter() - start
        groups = open_catalog(url)["dup_near"].values
    row = {k: i for i, k in enumerate(ds["image_id"].values)}
    peer_pairs = {frozenset((int(a.split(".")[0]), int(b.split(".")[0]))) for a, v in found.items() for b in v}
    out = {"images": len(ok), "imagededup_s": peer_s, "pzscale_s": ours_s, "speedup": peer_s / ours_s,
           "pzscale_1_worker_s": one_s, "scaling_efficiency_2w": one_s / (2 * ours_s),
           "pzscale_hash_pass_s": report.hash_stage.seconds,
           "share_of_imagededup_pairs_grouped_by_pzscale": float(np.mean([groups[a] == groups[b]
                                                                          for a, b in map(tuple, peer_pairs)]))
           if peer_pairs else 1.0}
    for kind in ("exact", "near"):
        planted = [(row[d["copy_of"]], row[d["image_id"]]) for d in truth["duplicates"] if d["kind"] == kind]
        out[f"recall_{kind}_imagededup"] = float(np.mean([frozenset(p) in peer_pairs for p in planted]))
        out[f"recall_{kind}_pzscale"] = float(np.mean([groups[a] == groups[b] for a, b in planted]))
    # precision of the pairs each reports, against the planted copies (originals copied twice included)
    same = pd.Series(np.arange(len(groups)))
    for d in truth["duplicates"]:
        same[row[d["image_id"]]] = row[d["copy_of"]]
    true_pairs = sum(1 for a, b in map(tuple, peer_pairs) if same[a] == same[b])
    out["pair_precision_imagededup"] = true_pairs / max(1, len(peer_pairs))
    frame = pd.DataFrame({"g": groups, "t": same.to_numpy()})[groups >= 0]
    predicted = int((frame.groupby("g").size() * (frame.groupby("g").size() - 1) // 2).sum())
    correct = int((frame.groupby(["g", "t"]).size() * (frame.groupby(["g", "t"]).size() - 1) // 2).sum())
    out["pair_precision_pzscale_groups"] = correct / max(1, predicted)
    print(f"  end to end {len(ok):,} images: imagededup {peer_s:.1f} s, pzscale {ours_s:.1f} s")
    return out


def summary(results: dict, n: int) -> list[dict]:
    """Entries for the projection and the plot: candidate generation at N and 4N (with its growth
    exponent) and the end-to-end near dedup."""
    runs = results["scaling"]["real_phash"]["runs"]
    small, large = runs[str(n)], runs[str(4 * n)]
    exponent = math.log(large["seconds"] / small["seconds"]) / math.log(4)
    peer = results["peer_on_encodings"]
    e2e = results["end_to_end"]
    out = [{"stage": "near-dup candidates", "workers": 2, "images": r["hashes"], "device": "cpu",
            "images_per_s": r["hashes"] / r["seconds"], "seconds": r["seconds"], "growth_exponent": exponent,
            "peer_ratio": peer["speedup_at_target"] if r["hashes"] == peer["target_hashes"] else None}
           for r in (small, large)]
    for workers, seconds in ((1, e2e["pzscale_1_worker_s"]), (2, e2e["pzscale_s"])):
        out.append({"stage": "dedup end to end (hash pass + near)", "workers": workers, "images": e2e["images"],
                    "device": "cpu", "images_per_s": e2e["images"] / seconds,
                    "peer_ratio": e2e["imagededup_s"] / seconds})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=25_000, help="N of the scaling run (4N is run too)")
    parser.add_argument("--images", type=int, default=4096, help="images of the end-to-end comparison")
    parser.add_argument("--peer-sizes", type=int, nargs="+", default=[2500, 5000, 10000])
    parser.add_argument("--peer-budget", type=float, default=90.0, help="seconds of imagededup runs on encodings")
    args = parser.parse_args()
    (HERE / "data").mkdir(exist_ok=True)
    source = dataset(32768)
    print(f"pHashes of {source} and of its rotations ...")
    hashes = real_hashes(source)
    results: dict = {"metadata": {"machine": machine(), "suite": "dedup", "threshold": THRESHOLD,
                                  "load_average_at_start": os.getloadavg(),
                                  "cluster": "LocalCluster, 2 worker processes x 1 thread",
                                  "hash_source": f"{source.name}: pHash of every image and its 3 rotations "
                                                 f"({len(hashes):,} hashes)"}}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        pzscale_pairs(client, hashes[:2000])  # warm the workers (imports, shuffle extension)
        print("scaling N -> 4N:")
        results["scaling"] = scaling(client, hashes, args.n)
        print("imagededup find_duplicates on encodings:")
        results["peer_on_encodings"] = peer_on_encodings(client, hashes, args.peer_sizes, 4 * args.n,
                                                         args.peer_budget)
        print("end to end on images:")
        folder = dataset(args.images)
        results["end_to_end"] = end_to_end(client, folder, json.loads((folder / "truth.json").read_text()))
    # other jobs on the machine slow both sides alike within one run; the load says how noisy it was
    results["metadata"]["load_average_at_end"] = os.getloadavg()
    results["summary"] = summary(results, args.n)
    out = HERE / "results" / f"dedup--{socket.gethostname()}--cpu.json"
    out.write_text(json.dumps(results, indent=1, default=float))
    print(json.dumps({k: v for k, v in results.items() if k != "metadata"}, indent=1, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
