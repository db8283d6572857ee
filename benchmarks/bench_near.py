"""Near-duplicate candidate search (``dedup.near_pairs``) measured at 1M, 4M and 16.8M pHashes of plankton-like
images, not uniform random values: time, peak memory (workers and this process), pairs, growth exponent, recall.

The hashes: ``pzscale synth``'s 1,048,576 images of the scale benchmark (drawn diatom chains, discs, radiolarians,
arrow worms, copepods, detritus and bubbles over uneven backgrounds, 2% of them planted near copies: rescaled,
re-toned, shifted, JPEG q70), decoded and hashed as the hash pass does (``imagehash.phashes_and_profiles``). Larger
sets are the same images turned and mirrored (the 8 symmetries of the square) and with their polarity inverted
(dark-field against bright-field cameras): 16 variants of each image, computed exactly from its DCT coefficients
(a mirror changes the sign of odd frequencies, a quarter turn transposes them, an inversion negates them), so the
bucket skew of look-alike shapes carries over to every variant. 16 variants make 16,777,216 hashes (96% of
Planktonzilla's 17.4M); sizes below take the first variants in full (1M: the images as they are; 4M: 4 of them).

At each size: ``near_pairs`` with the bands ``choose_bands`` picks from a 200,000-hash sample (what the dedup stage
runs), on a ``connect()`` cluster of 2 workers; and with the bands chosen at the largest size held fixed (the
growth of one configuration). Recall: every planted near copy within the threshold of its original (in every
variant) must be among the pairs found, and on a 200,000-hash random subsample the pairs found must equal brute
force (all pairs, tiled popcounts). Writes ``results/near--<host>--cpu.json`` and adds its figures to the scale
summary (``results/scale--<host>--cpu.json``) when that exists. Run: ``make bench-near``.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import ClientPeak, dataset  # noqa: E402
from common import DATA, WorkerMemory, cluster, machine, replace_block, result_path, save  # noqa: E402

from pzscale import dedup, imagehash  # noqa: E402
from pzscale.dedup.near import SAMPLE  # noqa: E402

THRESHOLD = dedup.DEFAULT_NEAR_THRESHOLD
POOL_IMAGES = 1_048_576
SUBSAMPLE = 200_000


def _hash_file(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Image ids, pHashes and 8 x 8 DCT coefficients (float32) of one parquet file's decodable images."""
    table = pq.read_table(path, columns=["image", "dataset", "ObjID"])
    data = table.column("image").combine_chunks().field("bytes").to_pylist()
    ids = [f"{d}:{o}" for d, o in zip(table.column("dataset").to_pylist(), table.column("ObjID").to_pylist(),
                                      strict=True)]
    keep, thumbs = [], []
    for i, item in enumerate(data):
        try:
            with Image.open(io.BytesIO(item)) as img:
                pixels = np.asarray(img)
        except Exception:  # noqa: BLE001, S112 - the planted corrupt rows
            continue
        keep.append(i)
        thumbs.append(imagehash.grey_thumbnail(pixels))
    coef = imagehash.low_dct(np.stack(thumbs))
    return [ids[i] for i in keep], imagehash.pack_bits(imagehash.phash_bits(coef)), coef.astype(np.float32)


def pool(folder: Path) -> dict:
    """pHashes and DCT coefficients of every image of ``folder`` (cached next to it), with the planted pairs."""
    cache = DATA / f"{folder.name}-phash.npz"
    if not cache.exists():
        with mp.get_context("spawn").Pool(2) as workers:
            parts = workers.map(_hash_file, [str(p) for p in sorted(folder.glob("*.parquet"))], chunksize=1)
        np.savez(cache, ids=np.array([i for p in parts for i in p[0]]), phash=np.concatenate([p[1] for p in parts]),
                 coef=np.concatenate([p[2] for p in parts]))
    data = dict(np.load(cache))
    truth = json.loads((folder / "truth.json").read_text())
    index = {v: i for i, v in enumerate(data["ids"].tolist())}
    near = [(index[d["copy_of"]], index[d["image_id"]]) for d in truth["duplicates"]
            if d["kind"] == "near" and d["copy_of"] in index and d["image_id"] in index]
    data["planted"] = np.array(near, np.int64).reshape(-1, 2)
    return data


def variant(coef: np.ndarray, k: int) -> np.ndarray:
    """pHashes of variant ``k`` (0-15) of the images: bit 0 transpose, 1 mirror left-right, 2 mirror top-bottom,
    3 invert; variant 0 is the images as they are."""
    c = coef.transpose(0, 2, 1) if k & 1 else coef
    freq = np.arange(imagehash.PHASH_LOW)
    sign = np.ones((imagehash.PHASH_LOW, imagehash.PHASH_LOW), np.float32)
    if k & 2:
        sign = sign * (-1.0) ** freq[None, :]
    if k & 4:
        sign = sign * (-1.0) ** freq[:, None]
    if k & 8:
        sign = -sign
        sign[0, 0] = 1.0  # the mean brightness stays positive
    return imagehash.pack_bits(imagehash.phash_bits(c * sign))


def measure(client, hashes: np.ndarray, bands: int | None) -> dict:
    unique = np.unique(hashes)
    rng = np.random.default_rng(0)
    sample = unique[rng.choice(len(unique), SAMPLE, replace=False)] if len(unique) > SAMPLE else unique
    chosen = bands or dedup.choose_bands(THRESHOLD, len(unique), sample)
    spec = dedup.BandSpec(THRESHOLD, chosen)
    memory = WorkerMemory(client)
    memory.start()
    with ClientPeak() as me:
        started = time.perf_counter()
        pairs, stats = dedup.near_pairs(client, unique, spec)
        seconds = time.perf_counter() - started
    row = {"hashes": len(hashes), "unique": len(unique), "bands": chosen, "keys": spec.n_keys,
           "seconds": seconds, "peak_rss_mib": memory.peak() / 2**20, "client_peak_rss_mib": me.peak / 2**20,
           "pairs": len(pairs), **stats}
    print(f"  {len(hashes):,} hashes, bands {chosen} ({spec.n_keys} keys): {seconds:,.1f} s, {len(pairs):,} pairs, "
          f"{stats['pairs_compared']:,} compared, largest bucket {stats['largest_bucket']:,}, worker peak "
          f"{row['peak_rss_mib']:,.0f} MiB, client {row['client_peak_rss_mib']:,.0f} MiB", flush=True)
    return row, pairs


def planted_recall(pairs: pd.DataFrame, data: dict, variants: int) -> dict:
    """Planted near copies within the threshold (in each variant used) found among the pairs."""
    found = pd.DataFrame({"a": np.minimum(pairs["a"], pairs["b"]), "b": np.maximum(pairs["a"], pairs["b"]),
                          "hit": True}).drop_duplicates(["a", "b"])
    expected, hit = 0, 0
    for k in range(variants):
        h = variant(data["coef"], k) if k else data["phash"]
        a, b = h[data["planted"][:, 0]], h[data["planted"][:, 1]]
        within = (imagehash.hamming(a, b) <= THRESHOLD) & (a != b)
        want = pd.DataFrame({"a": np.minimum(a, b)[within], "b": np.maximum(a, b)[within]}).drop_duplicates()
        expected += len(want)
        hit += int(want.merge(found, on=["a", "b"], how="left")["hit"].fillna(False).astype(bool).sum())
    return {"planted_within_threshold": expected, "found": hit, "recall": hit / max(1, expected)}


def brute_force_recall(values: np.ndarray, bands: int) -> dict:
    values = np.unique(values)
    tile, truth = 4096, set()
    for i in range(0, len(values), tile):
        for j in range(i, len(values), tile):
            d = imagehash.hamming(values[i : i + tile, None], values[None, j : j + tile])
            ii, jj = np.nonzero(d <= THRESHOLD)
            keep = (ii + i) < (jj + j)
            truth.update(zip(values[ii[keep] + i].tolist(), values[jj[keep] + j].tolist(), strict=True))
    a, b, _ = dedup.search(values, dedup.BandSpec(THRESHOLD, bands))
    ours = {(min(x, y), max(x, y)) for x, y in zip(a.tolist(), b.tolist(), strict=True)}
    return {"hashes": len(values), "brute_force_pairs": len(truth), "found": len(ours & truth),
            "extra": len(ours - truth), "recall": len(ours & truth) / max(1, len(truth))}


def in_process(data: dict, variants: list[int]) -> None:
    """CPU seconds of ``dedup.search`` over every key in this process, per size: growth without the load of others."""
    import resource

    rows = []
    for v in sorted(variants):
        h = np.unique(np.concatenate([data["phash"]] + [variant(data["coef"], k) for k in range(1, v)]))
        rng = np.random.default_rng(0)
        spec = dedup.BandSpec(THRESHOLD, dedup.choose_bands(THRESHOLD, len(h), h[rng.choice(len(h), SAMPLE,
                                                                                             replace=False)]))
        started = time.process_time()
        a, _, stats = dedup.search(h, spec)
        seconds = time.process_time() - started
        rows.append({"hashes": v * len(data["phash"]), "unique": len(h), "bands": spec.bands, "keys": spec.n_keys,
                     "cpu_seconds": seconds, "seconds": seconds, "pairs": len(a), **stats,
                     "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        print(json.dumps(rows[-1]), flush=True)
        save("near-cpu", {"metadata": {"machine": machine(), "suite": "near-cpu", "variants": variants},
                          "runs": rows, "exponent": exponent(rows) if len(rows) > 1 else None})
        merge_into_scale(rows, "in-process CPU seconds of dedup.search (one process)")
    if len(rows) > 1:
        render_in_process(rows)


def render_in_process(rows: list[dict], m: dict | None = None) -> None:
    """The README's ``near`` block from in-process rows; ``m`` is the machine they ran on (this one by default)."""
    lines = ["| hashes | distinct | bands (keys) | CPU seconds | pairs within 8 bits | pairs compared | largest bucket "
             "| peak RSS |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['hashes']:,} | {r['unique']:,} | {r['bands']} ({r['keys']}) | {r['seconds']:,.1f} | "
              f"{r['pairs']:,} | {r['pairs_compared']:,} | {r['largest_bucket']:,} | {r['max_rss_mib']:,.0f} MiB |"
              for r in rows]
    m = m or machine()
    lines += ["", f"One process, {m['cpus']} CPU, commit {m['commit']}, {m['date'][:10]}: growth exponent of the CPU "
              f"time {exponent(rows):.2f}, of the pairs within the threshold "
              f"{np.polyfit(np.log([r['hashes'] for r in rows]), np.log([r['pairs'] for r in rows]), 1)[0]:.2f}."]
    replace_block("near", lines)


def merge_into_scale(rows: list[dict], how: str) -> None:
    """The near-candidate figures in the scale summary (``results/scale--<host>--cpu.json``), if it exists."""
    scale = result_path("scale")
    if not scale.exists() or not rows:
        return
    merged = json.loads(scale.read_text())
    merged["summary"]["near_candidates"] = [
        {"hashes": r["hashes"], "seconds": r["seconds"],
         "peak_rss_mib": r.get("peak_rss_mib", r.get("max_rss_mib")), "pairs_within_threshold": r["pairs"],
         "pairs_compared": r["pairs_compared"], "bands": r["bands"]} for r in rows]
    merged["summary"]["near_exponent"] = exponent(rows) if len(rows) > 1 else None
    merged["summary"]["near_measured_as"] = how
    scale.write_text(json.dumps(merged, indent=1, default=float))


def exponent(rows: list[dict]) -> float:
    """Least-squares slope of log(seconds) against log(hashes)."""
    x, y = np.log([r["hashes"] for r in rows]), np.log([r["seconds"] for r in rows])
    return float(np.polyfit(x, y, 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--in-process", action="store_true",
                        help="search in this process and time its CPU (for a VM shared with other jobs)")
    args = parser.parse_args()
    folder, _ = dataset(POOL_IMAGES, 0)
    data = pool(folder)
    if args.in_process:
        in_process(data, args.variants)
        return
    n = len(data["phash"])
    same = float(np.mean(variant(data["coef"], 0) == data["phash"]))
    print(f"pool: {n:,} images, {len(data['planted']):,} planted near copies; variant 0 = stored pHash for "
          f"{same:.4f}", flush=True)
    largest = max(args.variants)
    all_hashes = np.concatenate([data["phash"]] + [variant(data["coef"], k) for k in range(1, largest)])
    runs, fixed = [], []
    with cluster(2) as client:
        for v in sorted(args.variants, reverse=True):  # the largest first: its bands are then held fixed
            row, pairs = measure(client, all_hashes[: v * n], None)
            row["variants"] = v
            if v == largest:
                row["planted"] = planted_recall(pairs, data, v)
                print(f"  planted near copies: {row['planted']}", flush=True)
                fixed_bands = row["bands"]
            del pairs
            runs.append(row)
        for v in sorted(args.variants):
            if v == largest:
                fixed.append(runs[0])
                continue
            row, _ = measure(client, all_hashes[: v * n], fixed_bands)
            row["variants"] = v
            fixed.append(row)
    runs.sort(key=lambda r: r["hashes"])
    rng = np.random.default_rng(1)
    subsample = all_hashes[rng.choice(len(all_hashes), SUBSAMPLE, replace=False)]
    brute = brute_force_recall(subsample, runs[-1]["bands"])
    print(f"  brute force on a {SUBSAMPLE:,}-hash subsample: {brute}", flush=True)
    summary = {"near_candidates": [{"hashes": r["hashes"], "seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"],
                                    "client_peak_rss_mib": r["client_peak_rss_mib"], "bands": r["bands"]}
                                   for r in runs],
               "near_exponent": exponent(runs), "near_exponent_fixed_bands": exponent(fixed),
               "fixed_bands": fixed_bands, "planted_recall": runs[-1]["planted"]["recall"],
               "brute_force_recall": brute["recall"], "threshold": THRESHOLD}
    results = {"metadata": {"machine": machine(), "suite": "near", "pool_images": n, "variants": args.variants,
                            "workers": 2},
               "runs": runs, "fixed_bands_runs": fixed, "brute_force_subsample": brute, "summary": summary}
    save("near", results)
    merge_into_scale(runs, "wall seconds of dedup.near_pairs on 2 workers")
    render_readme(results)
    print(json.dumps(summary, indent=1))


def render_readme(results: dict) -> None:
    lines = ["| hashes | unique | bands (keys) | seconds | pairs found | pairs compared | largest bucket "
             "| peak RSS/worker | client peak RSS | fixed bands: seconds |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fixed = {r["hashes"]: r for r in results["fixed_bands_runs"]}
    for r in results["runs"]:
        lines.append(f"| {r['hashes']:,} | {r['unique']:,} | {r['bands']} ({r['keys']}) | {r['seconds']:,.1f} "
                     f"| {r['pairs']:,} | {r['pairs_compared']:,} | {r['largest_bucket']:,} "
                     f"| {r['peak_rss_mib']:,.0f} MiB | {r['client_peak_rss_mib']:,.0f} MiB "
                     f"| {fixed[r['hashes']]['seconds']:,.1f} |")
    s, m = results["summary"], results["metadata"]["machine"]
    lines += ["", f"{m['cpus']} CPU, commit {m['commit']}, {m['date'][:10]}: growth exponent "
              f"{s['near_exponent']:.2f} (bands chosen per size), {s['near_exponent_fixed_bands']:.2f} (bands of the "
              f"largest size, {s['fixed_bands']}, at every size); planted near copies found "
              f"{s['planted_recall']:.3f}; brute force on {SUBSAMPLE:,} hashes: recall {s['brute_force_recall']:.3f}."]
    replace_block("near", lines)


if __name__ == "__main__":
    main()

