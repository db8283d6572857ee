"""Environmental join throughput (points/s), side by side in one run:

- bare xarray: the same grid variable in memory (and, apart, timed with opening and loading it),
  one vectorised ``DataArray.sel(lat=, lon=, depth=, time=, method="nearest")`` (points'
  longitudes put in the grid's 0..360 convention first; no tolerances, no seam, no QC);
- pzscale kernel: ``grids.Grid.join`` on the same in-memory variable (index arithmetic per axis,
  longitude on the circle, tolerances, QC flags), and on the file opened lazily (it reads the
  boxes it needs itself, cold every repeat): compare the latter with bare xarray's load + sel;
- per-point loop: ``DataArray.sel(..., method="nearest")`` once per point (the naive way);
- pzscale stage: ``env.env()`` end to end on a catalog of the same points (read the position
  columns, open the grid once per worker, join, write ``env_*`` arrays and markers) on a
  LocalCluster of 2 worker processes, their grid caches emptied before every repeat (each
  worker opens and reads the grid once, then serves later shards from its opened file and boxes).

The grid is synthetic (``grids.synthetic_grid``): 0.5 degree, 6 levels, 12 months, 0..360.
Points are uniform over the globe, 0-300 m and one year, so every shard needs every month:
the worst case for the stage, which reads the grid once per shard.

Writes ``benchmarks/results/env--<host>--cpu.json``. Run: ``python benchmarks/bench_env.py``
(``--points 1000000 --repeats 3``, about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import numpy as np
import psutil
import xarray as xr
from distributed import Client, LocalCluster

from pzscale import catalog, grids
from pzscale.env import env
from pzscale.grids import Grid

HERE = Path(__file__).parent
VARIABLE = "thetao"


def machine() -> dict:
    def commit() -> str:
        try:
            return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  cwd=HERE, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    return {
        "host": socket.gethostname(), "platform": platform.platform(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total, "python": platform.python_version(),
        "commit": commit(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {p: version(p) for p in ("pzscale", "xarray", "numpy", "scipy", "netCDF4", "dask",
                                             "distributed", "zarr")},
        "load_average_at_start": os.getloadavg(),
    }


def stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def grid_file(resolution: float) -> str:
    path = HERE / "data" / f"env-grid-{resolution:g}deg.nc"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        grids.synthetic_grid(str(path) + ".tmp", resolution=resolution, months=12,
                             depths=(0.0, 10.0, 25.0, 50.0, 100.0, 200.0))
        os.replace(str(path) + ".tmp", path)
    return str(path)


def points(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    depth = rng.uniform(0, 300, n).astype(np.float32)
    start = np.datetime64("2019-01-01T00:00", "ms").astype(np.int64)
    return {"lat": rng.uniform(-89, 89, n), "lon": rng.uniform(-180, 180, n), "depth_min": depth,
            "depth_max": depth, "time": start + rng.integers(0, 364 * 86_400_000, n)}


def timed(fn, repeats: int) -> tuple[list[float], object]:
    seconds, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - started)
    return seconds, out


def bare_xarray(da: xr.DataArray, p: dict) -> np.ndarray:
    def ix(values: np.ndarray) -> xr.DataArray:
        return xr.DataArray(values, dims="obs")

    return da.sel(lat=ix(p["lat"]), lon=ix(p["lon"] % 360.0), depth=ix(p["depth_min"].astype(np.float64)),
                  time=ix(p["time"].astype("datetime64[ms]").astype("datetime64[ns]")), method="nearest").values


def loop(da: xr.DataArray, p: dict, m: int) -> np.ndarray:
    times = p["time"][:m].astype("datetime64[ms]").astype("datetime64[ns]")
    return np.array([float(da.sel(lat=p["lat"][i], lon=p["lon"][i] % 360.0, depth=float(p["depth_min"][i]),
                                  time=times[i], method="nearest")) for i in range(m)])


def clear_grid_cache() -> None:
    """Cold: no box read and no file opened by an earlier repeat (a worker opens the grid and reads it once)."""
    grids._BOXES.boxes.clear()
    grids._OPENED.clear()


def stage_catalog(p: dict, shard_len: int) -> str:
    url = str(HERE / "data" / f"env-catalog-{len(p['lat'])}.zarr")
    shutil.rmtree(url, ignore_errors=True)
    group = catalog.create(url, n_rows=len(p["lat"]), shard_len=shard_len)
    for _, start, stop in catalog.shard_ranges(0, len(p["lat"]), shard_len):
        catalog.write_arrays(group, start, stop, {k: v[start:stop] for k, v in p.items()})
    return url


def run_stage(p: dict, path: str, shard_len: int, workers: int, repeats: int) -> tuple[list[float], np.ndarray]:
    """Seconds of each repeat of the env stage over a catalog of the points ``p``, and the values it stored."""
    url = stage_catalog(p, shard_len)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        seconds = []
        for _ in range(repeats):
            client.run(clear_grid_cache)  # cold every repeat: no grid box cached from the previous one
            started = time.perf_counter()
            env(url, path, [VARIABLE], client=client, progress=False, overwrite=True)
            seconds.append(time.perf_counter() - started)
            for shard in catalog.done_shards(url, f"env/{VARIABLE}"):  # next repeat recomputes every shard
                os.remove(f"{url}/{catalog.PRIVATE}/done/env/{VARIABLE}/{shard:06d}.json")
    stored = catalog.open_group(url)[f"env_{VARIABLE}"][:]
    shutil.rmtree(url, ignore_errors=True)
    return seconds, stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--loop-points", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=float, default=0.5)
    parser.add_argument("--shard-len", type=int, default=65536)
    args = parser.parse_args()
    path = grid_file(args.resolution)
    p = points(args.points)
    n = args.points
    results: dict = {"metadata": {"machine": machine(), "suite": "env", "points": n, "grid": Path(path).name,
                                  "variable": VARIABLE, "shard_len": args.shard_len, "repeats": args.repeats}}
    def load_and_sel() -> np.ndarray:
        with xr.open_dataset(path) as ds:
            return bare_xarray(ds[VARIABLE].load(), p)

    load_s, _ = timed(load_and_sel, args.repeats)
    decoded = xr.open_dataset(path)[VARIABLE].load()  # bare xarray gets the grid in memory, decoded times
    results["metadata"]["grid_shape"] = dict(decoded.sizes)
    bare_s, bare = timed(lambda: bare_xarray(decoded, p), args.repeats)
    raw = grids.open_grid(path)[VARIABLE].load()  # the same values, in memory, times as numbers
    in_memory = Grid(raw)
    kernel_s, (values, qc) = timed(lambda: in_memory.join(p["lat"], p["lon"], depth_min=p["depth_min"],
                                                          depth_max=p["depth_max"], time=p["time"]), args.repeats)
    # the same cells as bare xarray wherever both agree the point is ok (seam points may differ)
    ok = qc == "ok"
    same = np.isclose(values[ok], bare[ok], equal_nan=True).mean()
    def from_file() -> tuple:
        clear_grid_cache()  # every repeat reads and decompresses the grid's box again
        with Grid.open(path, VARIABLE) as lazy:
            return lazy.join(p["lat"], p["lon"], depth_min=p["depth_min"], depth_max=p["depth_max"], time=p["time"])

    file_s, _ = timed(from_file, args.repeats)
    m = args.loop_points
    loop_s, looped = timed(lambda: loop(decoded, p, m), 1)
    loop_same = np.isclose(looped, bare[:m], equal_nan=True).mean()
    # the stage at 1 and 2 workers, on all points and on a quarter of them (how its cost grows with N)
    stage_s: dict[tuple[int, int], list[float]] = {}
    quarter = {k: v[: n // 4] for k, v in p.items()}
    for workers in (1, 2):
        for sub in (quarter, p):
            seconds, stored = run_stage(sub, path, args.shard_len, workers, args.repeats)
            stage_s[workers, len(sub["lat"])] = seconds
    stage_same = np.array_equal(stored, values, equal_nan=True)

    def rate(seconds: list[float], count: int) -> dict:
        return stats([count / s for s in seconds])

    r = {
        "bare_xarray_sel_points_per_s": rate(bare_s, n),
        "bare_xarray_load_grid_and_sel_points_per_s": rate(load_s, n),
        "pzscale_kernel_in_memory_points_per_s": rate(kernel_s, n),
        "pzscale_kernel_from_file_points_per_s": rate(file_s, n),
        "per_point_loop_points_per_s": rate(loop_s, m),
        **{f"pzscale_stage_{w}_workers_{size}_points_per_s": rate(sec, size) for (w, size), sec in stage_s.items()},
        "pzscale_stage_2_workers_points_per_s": rate(stage_s[2, n], n),
    }
    median = {k: v["median"] for k, v in r.items()}
    r["ratios"] = {
        "kernel_in_memory_vs_bare_xarray": median["pzscale_kernel_in_memory_points_per_s"]
        / median["bare_xarray_sel_points_per_s"],
        "kernel_from_file_vs_bare_xarray_with_grid_load": median["pzscale_kernel_from_file_points_per_s"]
        / median["bare_xarray_load_grid_and_sel_points_per_s"],
        "stage_vs_bare_xarray": median["pzscale_stage_2_workers_points_per_s"] / median["bare_xarray_sel_points_per_s"],
        "stage_vs_bare_xarray_with_grid_load": median["pzscale_stage_2_workers_points_per_s"]
        / median["bare_xarray_load_grid_and_sel_points_per_s"],
        "kernel_in_memory_vs_loop": median["pzscale_kernel_in_memory_points_per_s"]
        / median["per_point_loop_points_per_s"],
        "stage_scaling_efficiency_2w": median[f"pzscale_stage_2_workers_{n}_points_per_s"]
        / (2 * median[f"pzscale_stage_1_workers_{n}_points_per_s"]),
        "stage_rate_at_n_over_rate_at_quarter": median[f"pzscale_stage_2_workers_{n}_points_per_s"]
        / median[f"pzscale_stage_2_workers_{n // 4}_points_per_s"],
    }
    r["agreement"] = {"kernel_equals_bare_xarray_on_ok_points": float(same),
                      "loop_equals_bare_xarray": float(loop_same), "stage_equals_kernel": bool(stage_same),
                      "qc": {k: int((qc == k).sum()) for k in grids.QC_VALUES}}
    results["results"] = r
    results["summary"] = []
    for (workers, size), seconds in stage_s.items():
        stage_rate = size / float(np.median(seconds))
        results["summary"].append({
            "stage": "env join", "workers": workers, "images": size, "device": "cpu", "images_per_s": stage_rate,
            "ceiling_ratio": stage_rate / median["bare_xarray_sel_points_per_s"], "ceiling_target": 0.67,
            "kernel_ceiling_ratio": r["ratios"]["kernel_in_memory_vs_bare_xarray"],
            "peer_ratio": stage_rate / median["per_point_loop_points_per_s"]})
    out = HERE / "results" / f"env--{socket.gethostname()}--cpu.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float))
    print(json.dumps(r, indent=1, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
