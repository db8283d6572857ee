"""Ingest throughput and worker memory, side by side with the ceiling and the peer.

- ceiling: a decode-only loop over the same parquet on the same cores (a process pool of
  the same size reading row groups and fully decoding every image; no writes);
- peer: the Planktonzilla build's way, one process: read parquet, decode every image
  with PIL, build a record per row (as ``datasets.map`` does), no writes;
- pzscale: ``ingest()`` end to end (plan, decode, write Zarr shards and markers) on a
  LocalCluster of 1 and 2 worker processes, at two input sizes.

Each repeat is a round that runs every contender once, and ratios are medians of the per-round
ratios. Peak worker memory is sampled in untimed ingests: one before the rounds (the first at the
first size runs on fresh workers) and one after them (steady state, the figure compared across
sizes).

Writes ``benchmarks/results/ingest--<host>--cpu.json`` and rewrites the table in
``benchmarks/README.md``.  Run: ``make bench`` (quick) or ``make bench-full``.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from common import HERE, WorkerMemory, cluster, machine, save, stats
from distributed import Client
from PIL import Image

from pzscale.catalog import DEFAULT_SHARD_LEN
from pzscale.cluster import WORKER_ENV, worker_environment
from pzscale.ingest import ingest
from pzscale.synth import synth

SHARD_LEN = DEFAULT_SHARD_LEN


def dataset(n: int) -> Path:
    out = HERE / "data" / f"synth-{n}"
    if not (out / "truth.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        synth(out, images=n, seed=1, rows_per_file=4096, row_group_size=512)
    return out


def _decode_row_group(args: tuple[str, int]) -> int:
    path, rg = args
    table = pq.ParquetFile(path).read_row_group(rg, columns=["image"])
    n = 0
    for item in table.column("image").combine_chunks().field("bytes").to_pylist():
        try:
            with Image.open(io.BytesIO(item)) as img:
                img.load()
        except Exception:  # noqa: BLE001, S112 - corrupt rows cost what they cost
            pass
        n += 1
    return n


def _decode_and_write_row_group(args: tuple[str, int, str]) -> int:
    """The least any ingest must do: decode every image and write its bytes once."""
    path, rg, out_dir = args
    table = pq.ParquetFile(path).read_row_group(rg, columns=["image"])
    data = table.column("image").combine_chunks().field("bytes").to_pylist()
    for item in data:
        try:
            with Image.open(io.BytesIO(item)) as img:
                img.load()
        except Exception:  # noqa: BLE001, S112
            pass
    with open(f"{out_dir}/{Path(path).stem}-{rg}.bin", "wb") as fh:
        for item in data:
            fh.write(item)
    return len(data)


def row_groups(folder: Path) -> list[tuple[str, int]]:
    return [(str(p), rg) for p in sorted(folder.glob("*.parquet"))
            for rg in range(pq.ParquetFile(p).num_row_groups)]


def worker_pool(processes: int) -> mp.pool.Pool:
    """A spawn pool whose processes start with the environment pzscale's local workers get
    (``pzscale.cluster.WORKER_ENV``: allocator settings), so the ceiling is measured under them too."""
    with worker_environment():
        return mp.get_context("spawn").Pool(processes)


def ceiling(pool: mp.pool.Pool, folder: Path) -> float:
    start = time.perf_counter()
    n = sum(pool.map(_decode_row_group, row_groups(folder), chunksize=1))
    return n / (time.perf_counter() - start)


def io_ceiling(pool: mp.pool.Pool, folder: Path) -> float:
    with tempfile.TemporaryDirectory(dir=HERE / "data") as tmp:
        start = time.perf_counter()
        n = sum(pool.map(_decode_and_write_row_group, [(*rg, tmp) for rg in row_groups(folder)], chunksize=1))
        return n / (time.perf_counter() - start)


def peer(folder: Path) -> float:
    """Single-process loop in the style of the Planktonzilla build (HF datasets.map)."""
    start = time.perf_counter()
    n = 0
    for path in sorted(folder.glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            try:
                with Image.open(io.BytesIO(row["image"]["bytes"])) as img:
                    img.load()
                    row["height"], row["width"] = img.height, img.width
            except Exception:  # noqa: BLE001
                row["height"] = row["width"] = 0
            n += 1
    return n / (time.perf_counter() - start)


def pzscale_ingest(client: Client, folder: Path, n: int, shard_len: int) -> float:
    with tempfile.TemporaryDirectory(dir=HERE / "data") as tmp:
        start = time.perf_counter()
        ingest([str(folder)], f"{tmp}/catalog.zarr", shard_len=shard_len, client=client, progress=False)
        return n / (time.perf_counter() - start)


def peak_memory(client: Client, folder: Path, n: int, shard_len: int) -> int:
    """Peak worker RSS over one untimed ingest. The sampler takes each worker's GIL 200 times a
    second, so the timed runs go without it."""
    memory = WorkerMemory(client)
    memory.start()
    pzscale_ingest(client, folder, n, shard_len)
    return memory.peak()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[32768, 131072])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-len", type=int, default=SHARD_LEN)
    args = parser.parse_args()
    (HERE / "data").mkdir(exist_ok=True)
    results: dict = {"metadata": {"machine": machine(), "suite": "ingest", "shard_len": args.shard_len,
                                  "sizes": args.sizes, "repeats": args.repeats, "worker_env": WORKER_ENV,
                                  "order": "interleaved: each round runs every contender once; ratios are "
                                           "medians of the per-round ratios"},
                     "results": {}, "summary": []}
    folders = {n: dataset(n) for n in args.sizes}
    with worker_pool(2) as pool, cluster(1) as one, cluster(2) as two:
        pool.map(_decode_row_group, row_groups(folders[args.sizes[0]])[:2])  # warm the pool
        for n, folder in folders.items():
            print(f"--- {n} images", flush=True)
            # untimed and sampled: warms the workers (imports) and gives the peak of workers that
            # are fresh at the first size
            first = {w: peak_memory(c, folder, n, args.shard_len) for w, c in ((1, one), (2, two))}
            # Interleaved rounds: this VM's speed drifts by several percent within minutes, and a
            # ratio is only as good as the pairing of what it divides.
            rounds = []
            for _ in range(args.repeats):
                rounds.append({
                    "ceiling_decode_2proc": ceiling(pool, folder),
                    "ceiling_decode_write_2proc": io_ceiling(pool, folder),
                    "peer_single_process": peer(folder),
                    "pzscale_1w": pzscale_ingest(one, folder, n, args.shard_len),
                    "pzscale_2w": pzscale_ingest(two, folder, n, args.shard_len),
                })
                print({k: round(v) for k, v in rounds[-1].items()}, flush=True)
            # steady state: workers that have run every round (allocators keep what a shard needs)
            steady = {w: peak_memory(c, folder, n, args.shard_len) for w, c in ((1, one), (2, two))}
            res = results["results"][str(n)] = {k: stats([r[k] for r in rounds]) for k in rounds[0]}
            for workers in (1, 2):
                res[f"pzscale_{workers}w"] = {"images_per_s": res[f"pzscale_{workers}w"],
                                              "worker_peak_rss_bytes": steady[workers],
                                              "worker_peak_rss_first_run_bytes": first[workers]}

            def paired(fn, rounds=rounds) -> float:
                return statistics.median(fn(r) for r in rounds)

            res["ratios"] = {
                "pzscale_2w_over_ceiling": paired(lambda r: r["pzscale_2w"] / r["ceiling_decode_2proc"]),
                "pzscale_2w_over_decode_write_ceiling":
                    paired(lambda r: r["pzscale_2w"] / r["ceiling_decode_write_2proc"]),
                "pzscale_2w_over_peer": paired(lambda r: r["pzscale_2w"] / r["peer_single_process"]),
                "scaling_efficiency_2w": paired(lambda r: r["pzscale_2w"] / (2 * r["pzscale_1w"])),
                "pzscale_1w_over_ceiling": paired(lambda r: r["pzscale_1w"] / r["ceiling_decode_2proc"]),
                "pzscale_1w_over_peer": paired(lambda r: r["pzscale_1w"] / r["peer_single_process"]),
                "pzscale_2w_over_ceiling_per_round": stats([r["pzscale_2w"] / r["ceiling_decode_2proc"]
                                                            for r in rounds]),
            }
            for workers in (1, 2):
                results["summary"].append({
                    "stage": "ingest", "workers": workers, "images": n, "device": "cpu",
                    "images_per_s": res[f"pzscale_{workers}w"]["images_per_s"]["median"],
                    "ceiling_ratio": res["ratios"][f"pzscale_{workers}w_over_ceiling"], "ceiling_target": 0.7,
                    "peer_ratio": res["ratios"][f"pzscale_{workers}w_over_peer"],
                    "peak_rss_bytes": res[f"pzscale_{workers}w"]["worker_peak_rss_bytes"]})
            print(json.dumps(res, indent=1), flush=True)
    small, large = (results["results"][str(n)]["pzscale_2w"]["worker_peak_rss_bytes"] for n in args.sizes)
    results["memory_growth_large_over_small"] = large / small
    out = save("ingest", results)
    render_readme()
    print(f"wrote {out}")


def render_readme() -> None:
    """Rewrite the results table in benchmarks/README.md from every JSON under results/."""
    rows = ["| machine | images | ceiling: decode (2 proc) | decode + write bytes (2 proc) | peer (1 proc) "
            "| pzscale 1 worker | pzscale 2 workers | 2w / decode ceiling | 2w / decode+write | 2w / peer "
            "| scaling 1->2 | peak RSS per worker (2w) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for path in sorted((HERE / "results").glob("ingest--*.json")):
        data = json.loads(path.read_text())
        m = data["metadata"]["machine"]
        for n, r in data["results"].items():
            rows.append(
                f"| {m['cpus']} CPU, {m['commit']} | {int(n):,} | {r['ceiling_decode_2proc']['median']:,.0f} "
                f"| {r['ceiling_decode_write_2proc']['median']:,.0f} "
                f"| {r['peer_single_process']['median']:,.0f} | {r['pzscale_1w']['images_per_s']['median']:,.0f} "
                f"| {r['pzscale_2w']['images_per_s']['median']:,.0f} | {r['ratios']['pzscale_2w_over_ceiling']:.2f} "
                f"| {r['ratios']['pzscale_2w_over_decode_write_ceiling']:.2f} "
                f"| {r['ratios']['pzscale_2w_over_peer']:.2f} | {r['ratios']['scaling_efficiency_2w']:.2f} "
                f"| {r['pzscale_2w']['worker_peak_rss_bytes'] / 2**20:,.0f} MiB |")
    readme = HERE / "README.md"
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n" + "\n".join(rows) + f"\n{end}{tail}")


if __name__ == "__main__":
    main()
