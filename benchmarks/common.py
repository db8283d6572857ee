"""What every benchmark shares: machine facts, statistics over repeats, result files,
worker memory sampling and the README tables regenerated from the JSON results.

A result file is ``results/<suite>--<host>--<device>.json`` with ``metadata`` (machine,
versions, commit, parameters) and ``results`` (every figure as min/median/max over repeats).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import threading
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA = HERE / "data"
README = HERE / "README.md"
PACKAGES = ("pzscale", "dask", "distributed", "zarr", "xarray", "pyarrow", "pillow", "numpy", "torch",
            "open-clip-torch", "imagededup", "flox", "scipy")


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=HERE, check=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine(device: str = "cpu") -> dict:
    """Host, CPU, memory, device name, Python, package versions, commit and date."""
    info = {
        "host": socket.gethostname(), "platform": platform.platform(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(), "commit": commit(),
        "versions": {p: v for p in PACKAGES if (v := _version(p))},
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "device": device,
    }
    if device.startswith("cuda"):
        import torch

        info["device_name"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def result_path(suite: str, device: str = "cpu") -> Path:
    return RESULTS / f"{suite}--{socket.gethostname()}--{device.split(':')[0]}.json"


def save(suite: str, data: dict, device: str = "cpu") -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = result_path(suite, device)
    path.write_text(json.dumps(data, indent=1, default=float))
    return path


def load(suite: str) -> list[dict]:
    """Every saved result of a suite (all hosts and devices), oldest first."""
    files = sorted(RESULTS.glob(f"{suite}--*.json"))
    return sorted((json.loads(p.read_text()) for p in files), key=lambda d: d["metadata"]["machine"]["date"])


def replace_block(name: str, lines: list[str]) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in the README."""
    text = README.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    README.write_text(f"{head}{start}\n" + "\n".join(lines) + f"\n{end}{tail}")


def label(meta: dict) -> str:
    m = meta["machine"]
    where = m.get("device_name") or f"{m['cpus']} CPU"
    return f"{where}, {m['commit']}"


# ---------------------------------------------------------------- worker memory

def _start_rss_sampler(dask_worker, every: float = 0.005) -> None:
    """Sample this process's RSS in a daemon thread. ru_maxrss is no use here: Linux keeps it
    across fork+exec, so a worker inherits the peak of the process that spawned it."""
    proc = psutil.Process()
    dask_worker.pz_peak_rss = proc.memory_info().rss
    dask_worker.pz_sampling = True

    def sample() -> None:
        while dask_worker.pz_sampling:
            dask_worker.pz_peak_rss = max(dask_worker.pz_peak_rss, proc.memory_info().rss)
            time.sleep(every)

    threading.Thread(target=sample, daemon=True).start()


def _peak_rss(dask_worker) -> int:
    dask_worker.pz_sampling = False
    return dask_worker.pz_peak_rss


class WorkerMemory:
    """Peak RSS of every worker process of a client between ``start`` and ``peak``."""

    def __init__(self, client) -> None:
        self.client = client

    def start(self) -> None:
        self.client.run(_start_rss_sampler)

    def peak(self) -> int:
        return max(self.client.run(_peak_rss).values())


def cluster(workers: int):
    """The cluster a user gets from ``pzscale.cluster.connect`` (worker processes, one thread each)."""
    from pzscale.cluster import connect

    return connect(n_workers=workers, quiet=True)
