"""Ingest throughput and worker memory, side by side with the ceiling and the peer.

- ceiling: a decode-only loop over the same parquet on the same cores (a process pool of
  the same size reading row groups and fully decoding every image; no writes);
- peer: the Planktonzilla build's way, one process: read parquet, decode every image
  with PIL, build a record per row (as ``datasets.map`` does), no writes;
- pzscale: ``ingest()`` end to end (plan, decode, write Zarr shards and markers) on a
  LocalCluster of 1 and 2 worker processes, at two input sizes.

Writes ``benchmarks/results/ingest--<host>--cpu.json`` and rewrites the table in
``benchmarks/README.md``.  Run: ``make bench`` (quick) or ``make bench-full``.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
from common import HERE, WorkerMemory, cluster, machine, save, stats
from distributed import Client
from PIL import Image

from pzscale.catalog import DEFAULT_SHARD_LEN
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


def _rss() -> int:
    return psutil.Process().memory_info().rss


def pzscale_ingest(client: Client, folder: Path, n: int, repeats: int, shard_len: int) -> dict:
    rates = []
    baseline = max(client.run(_rss).values())
    memory = WorkerMemory(client)
    memory.start()
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(dir=HERE / "data") as tmp:
            start = time.perf_counter()
            ingest([str(folder)], f"{tmp}/catalog.zarr", shard_len=shard_len, client=client, progress=False)
            rates.append(n / (time.perf_counter() - start))
    return {"images_per_s": stats(rates), "worker_rss_start_bytes": baseline, "worker_peak_rss_bytes": memory.peak()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[32768, 131072])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-len", type=int, default=SHARD_LEN)
    args = parser.parse_args()
    (HERE / "data").mkdir(exist_ok=True)
    results: dict = {"metadata": {"machine": machine(), "suite": "ingest", "shard_len": args.shard_len,
                                  "sizes": args.sizes, "repeats": args.repeats}, "results": {}, "summary": []}
    folders = {n: dataset(n) for n in args.sizes}
    for n, folder in folders.items():
        res = results["results"][str(n)] = {}
        print(f"--- {n} images", flush=True)
        with mp.get_context("spawn").Pool(2) as pool:
            pool.map(_decode_row_group, row_groups(folder)[:2])  # warm the pool
            res["ceiling_decode_2proc"] = stats([ceiling(pool, folder) for _ in range(args.repeats)])
            res["ceiling_decode_write_2proc"] = stats([io_ceiling(pool, folder) for _ in range(args.repeats)])
        res["peer_single_process"] = stats([peer(folder) for _ in range(args.repeats)])
        for workers in (1, 2):
            with cluster(workers) as client:
                res[f"pzscale_{workers}w"] = pzscale_ingest(client, folder, n, args.repeats, args.shard_len)
        c, p = res["ceiling_decode_2proc"]["median"], res["peer_single_process"]["median"]
        one, two = res["pzscale_1w"]["images_per_s"]["median"], res["pzscale_2w"]["images_per_s"]["median"]
        cw = res["ceiling_decode_write_2proc"]["median"]
        res["ratios"] = {"pzscale_2w_over_ceiling": two / c, "pzscale_2w_over_decode_write_ceiling": two / cw,
                         "pzscale_2w_over_peer": two / p, "scaling_efficiency_2w": two / (2 * one)}
        for workers, rate in ((1, one), (2, two)):
            results["summary"].append({
                "stage": "ingest", "workers": workers, "images": n, "device": "cpu", "images_per_s": rate,
                "ceiling_ratio": rate / c, "ceiling_target": 0.7, "peer_ratio": rate / p,
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
