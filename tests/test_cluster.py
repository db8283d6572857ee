"""Dask clients: local processes, a scheduler address, and clear errors where a kind cannot run here
(no dask-cuda, no dask-gateway, no Kubernetes API: those are not faked)."""

import importlib.util
import os
import re
from pathlib import Path

import pytest

from pzscale.cluster import WORKER_ENV, connect, load_manifest
from pzscale.errors import PzscaleError

DEPLOYMENTS = Path(__file__).resolve().parents[1] / "deployments" / "kubernetes"


@pytest.mark.skipif(importlib.util.find_spec("dask_cuda") is not None, reason="dask-cuda is installed here")
def test_cuda_cluster_without_dask_cuda_says_what_to_install():
    with pytest.raises(PzscaleError, match=r"pip install 'pzscale\[gpu\]'"):
        connect(cuda=True, quiet=True)


def test_a_local_cluster_and_an_address_both_print_the_dashboard_link(capsys):
    with connect("local", n_workers=1) as client:
        local = capsys.readouterr().out
        with connect(client.scheduler.address) as again:
            by_address = capsys.readouterr().out
            assert again.submit(os.getpid, pure=False).result() != os.getpid()  # a worker process
    assert re.fullmatch(r"dask: 1 worker\(s\), dashboard http://127\.0\.0\.1:\d+/status\n", local)
    assert re.fullmatch(r"dask: 1 worker\(s\), dashboard http://\S+/status\n", by_address)


def _worker_memory_settings() -> tuple[bool, dict, int]:
    import numpy as np
    import psutil
    from numpy._core import multiarray

    before = psutil.Process().memory_info().rss
    block = np.ones(64 << 20, np.uint8)  # over glibc's largest default mmap threshold (32 MiB)
    del block
    kept = psutil.Process().memory_info().rss - before
    return multiarray._get_madvise_hugepage(), {k: os.environ.get(k) for k in WORKER_ENV}, kept


def test_local_workers_start_without_numpy_huge_pages_and_keep_freed_memory(monkeypatch):
    # what a Dask nanny leaves in its process's environment after starting any plain LocalCluster
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with connect("local", n_workers=1, quiet=True) as client:
        (huge_pages, environ, kept), = client.run(_worker_memory_settings).values()
    assert huge_pages is False
    assert environ == WORKER_ENV
    assert kept > 32 << 20  # the freed 64 MiB block stayed in the worker's heap for the next task
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # this process's environment is put back


def test_local_workers_take_the_environment_they_are_given():
    with connect("local", n_workers=1, quiet=True, worker_env={"MIMALLOC_PURGE_DELAY": "10"}) as client:
        (_, environ, kept), = client.run(_worker_memory_settings).values()
    assert environ["MIMALLOC_PURGE_DELAY"] == "10"
    assert environ["MALLOC_ARENA_MAX"] is None
    assert kept < 32 << 20  # Dask's own settings: the freed block went back to the kernel


def test_an_unknown_cluster_kind_lists_the_known_ones():
    with pytest.raises(PzscaleError, match=r"unknown cluster 'kubernets': use one of local, local-cuda, kubernetes, "
                                           r"gateway or a scheduler address"):
        connect("kubernets", quiet=True)


@pytest.mark.skipif(importlib.util.find_spec("dask_gateway") is not None, reason="dask-gateway is installed here")
def test_gateway_without_dask_gateway_names_the_extra():
    with pytest.raises(PzscaleError, match=r"dask-gateway cluster needs dask_gateway \(pip install 'pzscale\[k8s\]'\)"):
        connect("gateway", quiet=True)


def test_kubernetes_needs_one_daskcluster_manifest_or_a_name(tmp_path):
    with pytest.raises(PzscaleError, match="pass either manifest= .* or name="):
        connect("kubernetes", quiet=True)
    with pytest.raises(PzscaleError, match="pass either manifest="):
        connect("kubernetes", manifest=DEPLOYMENTS / "daskcluster.yaml", name="pzscale", quiet=True)
    with pytest.raises(PzscaleError, match="no such manifest file"):
        connect("kubernetes", manifest=tmp_path / "missing.yaml", quiet=True)
    with pytest.raises(PzscaleError, match="a DaskAutoscaler, not a DaskCluster"):
        connect("kubernetes", manifest=DEPLOYMENTS / "autoscaler.yaml", quiet=True)
    assert load_manifest(DEPLOYMENTS / "daskcluster.yaml")["metadata"]["name"] == "pzscale"


@pytest.mark.skipif(importlib.util.find_spec("dask_kubernetes") is None, reason="needs dask-kubernetes")
def test_kubernetes_without_api_access_fails_with_a_clear_error(tmp_path, monkeypatch):
    """No kubeconfig and no service account here: the real client fails, and says what to check."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(PzscaleError, match=r"kubernetes: cannot start or reach DaskCluster 'pzscale' .*check kubectl "
                                           r"access \(kubeconfig or service account\)"):
        connect("kubernetes", name="pzscale", quiet=True)
