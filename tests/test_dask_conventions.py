"""Dask as its users run it: a scheduler and workers started from their own command lines, found
through DASK_SCHEDULER_ADDRESS (as the Dask Helm chart and JupyterHub set it); the dashboard link
answers; a usage error comes before any cluster; progress as log lines when no one watches."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from distributed import Client

from pzscale import catalog, open_catalog
from pzscale.cluster import connect
from pzscale.split import assign_splits
from pzscale.train import train

pytestmark = pytest.mark.cluster
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return response.read().decode()


@pytest.fixture(scope="module")
def external_scheduler(tmp_path_factory):
    """``dask scheduler`` and ``dask worker`` processes, as an operator starts them."""
    port, dashboard = _free_port(), _free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path_factory.mktemp("dask-logs")
    with open(logs / "scheduler.log", "w") as scheduler_log, open(logs / "workers.log", "w") as workers_log:
        procs = [subprocess.Popen([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                   "--dashboard-address", f"127.0.0.1:{dashboard}"],
                                  stdout=scheduler_log, stderr=subprocess.STDOUT)]
        procs.append(subprocess.Popen([BIN / "dask", "worker", address, "--nworkers", "2", "--nthreads", "1",
                                       "--memory-limit", "4GiB", "--no-dashboard"],
                                      stdout=workers_log, stderr=subprocess.STDOUT))
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address, dashboard
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)


def _pzscale(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The command line in its own process, stderr not a terminal (as in a batch job or a pod)."""
    return subprocess.run([BIN / "pzscale", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PZSCALE_PROGRESS_SECONDS": "0", **(env or {})})


def test_the_command_line_runs_on_the_scheduler_named_by_dask_scheduler_address(external_scheduler, tmp_path):
    address, dashboard = external_scheduler
    env = {"DASK_SCHEDULER_ADDRESS": address}
    src, url, model = tmp_path / "src", str(tmp_path / "cat.zarr"), str(tmp_path / "model")
    assert _pzscale("synth", str(src), "-n", "600", "--seed", "4").returncode == 0
    ingest = _pzscale("ingest", str(src), "-c", url, "--shard-len", "256", env=env)
    assert ingest.returncode == 0, ingest.stderr
    # the run went to the external scheduler: its two workers and its dashboard, no local cluster
    assert f"dask: 2 worker(s), dashboard http://127.0.0.1:{dashboard}/status" in ingest.stderr
    assert "3 shard(s) written" in ingest.stdout
    # progress as timestamped log lines, one per shard here, not carriage returns
    lines = [line for line in ingest.stderr.splitlines() if " ingest: " in line]
    assert "\r" not in ingest.stderr and len(lines) >= 3
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO pzscale: ingest: 3/3 shards \(100%\), [\d,]+ images/s, "
                    r"0 failed, took \d+:\d\d:\d\d$", lines[-1]), lines[-1]
    assign_splits(url, seed=0)  # no cluster in these two: run here
    train(url, model, epochs=1, image_size=32, log=lambda *_: None)
    classify = _pzscale("-q", "classify", "-c", url, "-m", model, env=env)
    assert classify.returncode == 0, classify.stderr
    assert classify.stderr == ""  # -q: no progress, no dashboard line
    predicted = [name for name in open_catalog(url).data_vars if name.startswith("pred__")]
    classified = [stage for stage in catalog.stages_done(url) if stage.startswith("classify/")]
    assert predicted and len(classified) == 1 and catalog.done_shards(url, classified[0]) == {0, 1, 2}


def test_connect_honours_the_scheduler_address_config(external_scheduler, monkeypatch):
    import dask

    address, _ = external_scheduler
    with dask.config.set({"scheduler-address": address}), connect(quiet=True) as client:
        assert client.scheduler.address == address
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2
    # "local" still means a cluster of this machine's own, whatever the config says
    with dask.config.set({"scheduler-address": address}), connect("local", n_workers=1, quiet=True) as client:
        assert client.scheduler.address != address


def test_the_dashboard_link_answers(external_scheduler):
    _, dashboard = external_scheduler
    assert "Dask" in _fetch(f"http://127.0.0.1:{dashboard}/status")
    with connect("local", n_workers=1, quiet=True) as client:
        page = _fetch(client.dashboard_link)
        assert "bokeh" in page.lower() or "Dask" in page


def test_usage_errors_come_before_any_cluster_starts(tmp_path):
    # an address nothing listens on: connecting would hang for Dask's timeout, so a quick
    # one-line error shows that the arguments were checked first
    env = {"DASK_SCHEDULER_ADDRESS": f"tcp://127.0.0.1:{_free_port()}",
           "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "60s"}
    catalog.create(str(tmp_path / "cat.zarr"), n_rows=10, shard_len=256)
    cases = [
        (["classify", "-c", str(tmp_path / "cat.zarr"), "-m", str(tmp_path / "nomodel")], "nomodel/model_card.json"),
        (["ingest", str(tmp_path / "nothing"), "-c", str(tmp_path / "new.zarr")], "nothing: no such file or folder"),
    ]
    for args, message in cases:
        start = time.monotonic()
        result = _pzscale(*args, env=env, timeout=50)
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
        assert "dask:" not in result.stderr and time.monotonic() - start < 45
    # the other commands make the same checks (in this process: quicker, same code path)
    from typer.testing import CliRunner

    from pzscale.cli import app

    for args, message in [
        (["embed", "-c", str(tmp_path / "none.zarr"), "-m", str(tmp_path)], "none.zarr: no catalog here"),
        (["env", "-c", str(tmp_path / "cat.zarr"), "--grid", str(tmp_path / "no.nc"), "--var", "sst"], "no.nc"),
        (["dedup", "-c", str(tmp_path / "none.zarr")], "none.zarr: no catalog here"),
    ]:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and message in result.output and "dask:" not in result.output, args
