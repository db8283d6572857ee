"""The scale proof: synthetic images end to end on 2 local workers at two sizes (default 131,072 and 1,048,576).

Stages, one after the other on one ``pzscale.cluster.connect`` cluster of 2 worker processes (one thread each), at
the default shard length: ingest (parquet -> catalog), dedup (hash pass, then exact and near groups), split, classify
(the built-in 64 px CNN with a 602-class head, random weights: throughput only), env join (one variable of a
synthetic 0.5 degree monthly grid) and abundance (genus x 1 degree x month). For each: seconds, images/s, peak RSS
of each worker (sampled every 5 ms while the stage runs: ~3% of throughput, the same at both sizes) and of this
process (the client: the near search's unique hashes and the dedup groups live here). Also the catalog's bytes and
object count on disk, and ``pzscale synth``'s own rate where it made the data here.

Side by side at the largest size, in the same run:
- ``classify_vs_decode_loop``: the stage's images/s over 2 bare loops (2 processes, one torch thread each) that
  decode the same catalog bytes, letterbox, run the same model and take the top 5 (``bench_embed``), on a
  32,768-image sample of the catalog;
- ``env_stage_vs_sel``: the stage's located points/s over one vectorised xarray ``.sel(method="nearest")`` of the
  same points on the grid variable held in memory (``bench_env.bare_xarray``).

Near-duplicate search at 1M-16.8M hashes is ``bench_near.py`` (on 2 workers, or ``--in-process``); it merges its
figures into the summary written here. Writes ``results/scale--<host>--cpu.json``.
Run: ``make bench-scale`` (about 45 minutes on 2 cores the first time, 10 of them synthesising the images).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, WorkerMemory, cluster, machine, replace_block, save  # noqa: E402

from pzscale import grids  # noqa: E402
from pzscale.abundance import abundance  # noqa: E402
from pzscale.catalog import open_group  # noqa: E402
from pzscale.classify import classify  # noqa: E402
from pzscale.dedup import dedup  # noqa: E402
from pzscale.env import env  # noqa: E402
from pzscale.ingest import ingest  # noqa: E402
from pzscale.split import assign_splits  # noqa: E402
from pzscale.synth import synth  # noqa: E402

ROWS_PER_FILE, ROW_GROUP = 4096, 512
CLASSIFY_SAMPLE = 32_768
VARIABLE = "thetao"


def dataset(n: int, seed: int) -> tuple[Path, float | None]:
    """Synthetic parquet shards of ``n`` images (made once, then reused) and synth's images/s if made now."""
    folder = DATA / f"scale-{n}-seed{seed}"
    if (folder / "truth.json").exists():
        return folder, None
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    synth(folder, images=n, seed=seed, rows_per_file=ROWS_PER_FILE, row_group_size=ROW_GROUP, workers=2)
    return folder, n / (time.perf_counter() - started)


def grid_file() -> str:
    path = DATA / "scale-grid-0.5deg.nc"
    if not path.exists():  # synth's positions are dated 2019-2022
        grids.synthetic_grid(str(path) + ".tmp", resolution=0.5, months=48, depths=(0.0, 10.0, 25.0, 50.0, 100.0,
                                                                                      200.0, 300.0))
        os.replace(str(path) + ".tmp", path)
    return str(path)


def classify_model(work: Path) -> str:
    import torch
    from bench_embed import classify_model as make

    torch.manual_seed(0)
    return make(work / "cnn-head")


class ClientPeak:
    """Peak RSS of this process while a stage runs (sampled every 5 ms)."""

    def __enter__(self) -> ClientPeak:
        self.proc, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *_) -> None:
        self.running = False
        self.thread.join()


def measured(client, n: int, name: str, fn) -> tuple[dict, object]:
    memory = WorkerMemory(client)
    memory.start()
    with ClientPeak() as me:
        started = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - started
    row = {"seconds": seconds, "images_per_s": n / seconds, "peak_rss_mib": memory.peak() / 2**20,
           "client_peak_rss_mib": me.peak / 2**20}
    print(f"  {name}: {seconds:,.1f} s, {row['images_per_s']:,.0f} img/s, worker peak {row['peak_rss_mib']:,.0f} MiB, "
          f"client peak {row['client_peak_rss_mib']:,.0f} MiB", flush=True)
    return row, out


def disk(path: str) -> dict:
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    return {"bytes": sum(os.path.getsize(f) for f in files), "objects": len(files)}


def run_size(n: int, seed: int, work: Path, model: str, grid: str, side_by_side: bool) -> dict:
    folder, synth_rate = dataset(n, seed)
    url = str(work / f"catalog-{n}.zarr")
    shutil.rmtree(url, ignore_errors=True)
    out: dict = {"images": n, "synth_images_per_s": synth_rate, "stages": {}}
    print(f"--- {n:,} images (synth {'reused' if synth_rate is None else f'{synth_rate:,.0f} img/s'})", flush=True)
    with cluster(2) as client:
        stages = out["stages"]
        stages["ingest"], _ = measured(client, n, "ingest", lambda: ingest([str(folder)], url, client=client,
                                                                         progress=False))
        stages["dedup"], report = measured(client, n, "dedup (hash pass + exact + near)",
                                           lambda: dedup(url, methods=("exact", "near"), client=client,
                                                         progress=False))
        stages["dedup"]["hash_pass_seconds"] = report.hash_stage.seconds
        stages["dedup"]["near"] = {k: v for k, v in report.per_method["near"].items() if not isinstance(v, list)}
        stages["split"], _ = measured(client, n, "split", lambda: assign_splits(url, seed=42, client=client))
        stages["classify"], _ = measured(client, n, "classify", lambda: classify(url, model, client=client,
                                                                                 progress=False))
        stages["env"], _ = measured(client, n, "env", lambda: env(url, grid, [f"temperature={VARIABLE}"],
                                                                  client=client, progress=False))
        stages["abundance"], _ = measured(client, n, "abundance", lambda: abundance(
            url, rank="genus", cell_deg=1.0, out=str(work / f"abundance-{n}.zarr"), client=client))
    out["catalog"] = disk(url)
    out["wall_seconds"] = sum(s["seconds"] for s in out["stages"].values())
    if side_by_side:
        out["side_by_side"] = side_by_side_ratios(url, model, grid, out["stages"])
    shutil.rmtree(url, ignore_errors=True)
    return out


def side_by_side_ratios(url: str, model: str, grid: str, stages: dict) -> dict:
    import xarray as xr
    from bench_embed import bare_classify_loops
    from bench_env import bare_xarray

    group = open_group(url)
    ok = np.flatnonzero(group["status"][:] == "ok")
    rows = np.sort(np.random.default_rng(0).choice(ok, min(CLASSIFY_SAMPLE, len(ok)), replace=False))
    encoded = [bytes(b) for b in group["image_bytes"].get_orthogonal_selection((rows,))]
    bare = bare_classify_loops(model, encoded, 64, 2)
    print(f"  bare classify loops (2 processes, {len(encoded):,} images): {bare:,.0f} img/s", flush=True)
    located = {k: group[k][:] for k in ("lat", "lon", "depth_min", "time")}
    has = np.isfinite(located["lat"]) & np.isfinite(located["lon"]) & (located["time"] != np.iinfo(np.int64).min)
    points = {k: v[has] for k, v in located.items()}
    da = xr.open_dataset(grid)[VARIABLE].load()
    bare_xarray(da, {k: v[:1000] for k, v in points.items()})  # warm
    started = time.perf_counter()
    bare_xarray(da, points)
    sel_rate = has.sum() / (time.perf_counter() - started)
    env_rate = has.sum() / stages["env"]["seconds"]
    print(f"  bare .sel: {sel_rate:,.0f} points/s; env stage {env_rate:,.0f} located points/s", flush=True)
    return {"classify_stage_images_per_s": stages["classify"]["images_per_s"], "bare_decode_loop_images_per_s": bare,
            "classify_vs_decode_loop": stages["classify"]["images_per_s"] / bare,
            "located_points": int(has.sum()), "env_stage_points_per_s": env_rate, "bare_sel_points_per_s": sel_rate,
            "env_stage_vs_sel": env_rate / sel_rate}


def summarize(runs: list[dict]) -> dict:
    small, large = runs[0], runs[-1]
    summary = {
        "images": large["images"],
        "stages": {k: {"images_per_s": v["images_per_s"], "peak_rss_mib": v["peak_rss_mib"]}
                   for k, v in large["stages"].items()},
        "rss_growth": max(large["stages"][k]["peak_rss_mib"] / small["stages"][k]["peak_rss_mib"]
                          for k in large["stages"]),
        "per_image_time_growth": max(small["stages"][k]["images_per_s"] / large["stages"][k]["images_per_s"]
                                     for k in large["stages"]),
        "compared": [small["images"], large["images"]],
    }
    summary.update({k: large.get("side_by_side", {}).get(k) for k in ("env_stage_vs_sel", "classify_vs_decode_loop")})
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[131_072, 1_048_576])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = DATA / "scale-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model, grid = classify_model(work), grid_file()
    runs = [run_size(n, args.seed, work, model, grid, side_by_side=n == max(args.sizes)) for n in sorted(args.sizes)]
    results = {"metadata": {"machine": machine(), "suite": "scale", "sizes": args.sizes, "workers": 2,
                            "threads_per_worker": 1, "shard_len": "default"},
               "runs": {str(r["images"]): r for r in runs}, "summary": summarize(runs)}
    path = save("scale", results)
    render_readme(results)
    print(json.dumps(results["summary"], indent=1, default=float))
    print(f"wrote {path}")
    shutil.rmtree(work, ignore_errors=True)


def render_readme(results: dict) -> None:
    runs = list(results["runs"].values())
    lines = ["| stage | " + " | ".join(f"{r['images']:,} img/s | peak RSS/worker" for r in runs) + " |",
             "|---|" + "---:|---:|" * len(runs)]
    for stage in runs[0]["stages"]:
        lines.append(f"| {stage} | " + " | ".join(f"{r['stages'][stage]['images_per_s']:,.0f} | "
                                                   f"{r['stages'][stage]['peak_rss_mib']:,.0f} MiB" for r in runs)
                     + " |")
    lines.append("| wall (all stages) | " + " | ".join(f"{r['wall_seconds'] / 60:,.1f} min | " for r in runs) + " |")
    lines.append("| catalog on disk | " + " | ".join(f"{r['catalog']['bytes'] / 2**30:,.2f} GiB | "
                                                    f"{r['catalog']['objects']:,} objects" for r in runs) + " |")
    s = results["summary"]
    lines.append("")
    m = results["metadata"]["machine"]
    lines.append(f"Machine: {m['cpus']} CPU, commit {m['commit']}, {m['date'][:10]}. Peak RSS growth (max over stages) "
                 f"{s['rss_growth']:.2f}x; per-image time growth (max over stages) {s['per_image_time_growth']:.2f}x; "
                 f"classify / bare decode loop {s['classify_vs_decode_loop']:.2f}; env stage / bare `.sel` "
                 f"{s['env_stage_vs_sel']:.2f}.")
    replace_block("scale", lines)


if __name__ == "__main__":
    main()
