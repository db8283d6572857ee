"""Dask clients for pzscale: a local cluster of worker processes (CPU or one worker per GPU),
a Dask cluster on Kubernetes (dask-kubernetes operator), a dask-gateway cluster, or any
running scheduler by address.

Stages never import this module: they take the ``Client`` it returns.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distributed import Client

from pzscale.errors import PzscaleError

KINDS = ("local", "local-cuda", "kubernetes", "gateway")

# Set in every local worker process before it starts (``connect(worker_env=...)`` changes them).
# - numpy asks the kernel for transparent huge pages on every array of 4 MB or more; with THP defrag
#   "madvise" (a common default) each fresh huge page may wait for memory compaction: 0.17-0.23 s of
#   kernel time per shard write (~100 MB buffers) with huge pages, 0.05 s without.
# - Freed memory stays in the worker: every shard task needs the same ~200 MB again (parquet columns,
#   image bytes, zarr's shard buffer), and handing it back to the kernel after each task (Dask's trim
#   threshold, glibc's mmap for blocks over 32 MB and its heap per thread, Arrow's mimalloc purging
#   after 10 ms) makes the kernel supply and zero it again for the next shard: 540,000 page faults
#   and 3.6 s of kernel time per 131,072 images ingested on 2 workers; ~2,000 faults and 2.0 s with
#   these settings, +10% images/s. The price: a worker's RSS stays near its peak between tasks (~1 GB at the default
#   shard length), far below a local worker's memory limit. Figures: benchmarks/README.md.
WORKER_ENV = {
    "NUMPY_MADVISE_HUGEPAGE": "0",
    "MALLOC_ARENA_MAX": "1",  # one heap for all threads: a thread's own arena mmaps big blocks afresh
    "MALLOC_MMAP_THRESHOLD_": str(2**30),  # blocks up to 1 GiB come from the heap, not a fresh mmap
    "MALLOC_TRIM_THRESHOLD_": str(2**32),  # and the heap is not trimmed after each task (Dask: 64 KiB)
    "MIMALLOC_PURGE_DELAY": "-1",  # Arrow's allocator keeps its freed pages too
}


def connect(
    address: str | None = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | int = "auto",
    cuda: bool = False,
    manifest: str | os.PathLike | dict | None = None,
    name: str | None = None,
    namespace: str | None = None,
    gateway_address: str | None = None,
    options: dict | None = None,
    adapt: tuple[int, int] | None = None,
    worker_env: dict[str, str] | None = None,
    quiet: bool = False,
) -> Client:
    """A Dask client for pzscale stages; prints the worker count and the dashboard link.

    ``address`` is a scheduler address (``tcp://host:8786``, ``tls://...``) or a kind:

    - ``None``: the scheduler named by Dask's ``scheduler-address`` config (the
      ``DASK_SCHEDULER_ADDRESS`` environment variable, as the Dask Helm chart and JupyterHub set it),
      else a local cluster.
    - ``"local"``: a LocalCluster of worker *processes*, ``n_workers`` (default one
      per core) of one thread each: decoding and encoding images holds the GIL, so threads
      would not scale. The dashboard listens on 127.0.0.1 only.
    - ``"local-cuda"`` (or ``cuda=True``): a dask-cuda LocalCUDACluster, one worker per GPU,
      each advertising the resource ``GPU=1`` that the model stages ask for.
    - ``"kubernetes"``: a DaskCluster of the dask-kubernetes operator, created from
      ``manifest`` (a DaskCluster YAML path or dict, e.g. ``deployments/kubernetes/daskcluster.yaml``;
      deleted when this Python process exits) or connected by ``name`` (left running).
      ``n_workers`` scales the default worker group, ``adapt=(minimum, maximum)`` adds a
      DaskAutoscaler. The dashboard stays inside the cluster; from outside, dask-kubernetes
      port-forwards it to localhost.
    - ``"gateway"``: a dask-gateway cluster at ``gateway_address`` (default: the ``gateway.address``
      Dask config, set by daskhub), a new one with ``options`` or an existing one by ``name``;
      ``n_workers`` scales it, ``adapt`` makes it adaptive.

    Local workers (and local CUDA workers) start with ``worker_env`` (default ``WORKER_ENV``:
    allocator settings; ``{}`` for Dask's own); other kinds take their environment from their
    manifests.
    """
    import dask

    if address is None and not cuda:
        address = dask.config.get("scheduler-address", None)
    kind = "local-cuda" if cuda and address in (None, "local") else (address or "local")
    if kind == "local":
        # The client owns the LocalCluster it starts here, so closing the client stops it; the
        # config is cleared for the call, or Client would connect to it and refuse the cluster arguments.
        with worker_environment(worker_env), dask.config.set({"scheduler-address": None}):
            client = Client(
                n_workers=n_workers or os.cpu_count() or 1,
                threads_per_worker=threads_per_worker,
                processes=True,
                memory_limit=memory_limit,
                dashboard_address="127.0.0.1:0",  # local only; never exposed on other interfaces
            )
    elif kind == "local-cuda":
        with worker_environment(worker_env):
            client = Client(local_cuda_cluster(memory_limit=memory_limit))
    elif kind == "kubernetes":
        client = Client(kubernetes_cluster(manifest=manifest, name=name, namespace=namespace, n_workers=n_workers,
                                           adapt=adapt, quiet=quiet))
    elif kind == "gateway":
        client = gateway_cluster(address=gateway_address, name=name, options=options, n_workers=n_workers,
                                 adapt=adapt).get_client()
    elif ":" in kind:
        client = Client(kind)
    else:
        raise PzscaleError(f"unknown cluster {kind!r}: use one of {', '.join(KINDS)} or a scheduler address "
                           "(tcp://host:8786)")
    if not quiet:
        print(describe(client))
    return client


def describe(client: Client) -> str:
    """``dask: N worker(s), dashboard <link>``: what a person needs to watch the run."""
    workers = len(client.scheduler_info(n_workers=-1)["workers"])
    return f"dask: {workers} worker(s), dashboard {client.dashboard_link}"


@contextlib.contextmanager
def worker_environment(env: dict[str, str] | None = None) -> Iterator[None]:
    """Workers started inside this block get ``env`` (default ``WORKER_ENV``) on top of what Dask's
    nannies set before spawning a worker process.

    A nanny lets a variable already in this process's environment win over its config, and writes
    its own pre-spawn variables into this environment when it starts a worker, so after any plain
    LocalCluster, Dask's ``MALLOC_TRIM_THRESHOLD_=65536`` would silently win. The variables are
    therefore also set in this process for the duration of the block, and put back after it.
    """
    import dask

    env = WORKER_ENV if env is None else env
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", default={}), **env}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _missing_extra(what: str, extra: str, error: Exception) -> PzscaleError:
    return PzscaleError(f"{what} needs {error.name or 'a missing package'} (pip install 'pzscale[{extra}]')")


def local_cuda_cluster(**kwargs: object) -> object:
    """A dask-cuda LocalCUDACluster with ``GPU=1`` per worker; dask-cuda is imported only here."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as e:
        raise PzscaleError(f"a CUDA cluster needs dask-cuda and a GPU (pip install 'pzscale[gpu]'): {e}") from None
    return LocalCUDACluster(threads_per_worker=1, resources={"GPU": 1}, dashboard_address="127.0.0.1:0", **kwargs)


def load_manifest(manifest: str | os.PathLike | dict) -> dict:
    """A Kubernetes object from a YAML file (its first document) or a dict, checked to have a kind and name."""
    if isinstance(manifest, dict):
        obj = manifest
    else:
        import yaml

        path = Path(manifest)
        if not path.is_file():
            raise PzscaleError(f"{path}: no such manifest file")
        obj = next(iter(yaml.safe_load_all(path.read_text())), None)
    if not isinstance(obj, dict) or not obj.get("kind") or not obj.get("metadata", {}).get("name"):
        raise PzscaleError(f"{manifest if not isinstance(manifest, dict) else 'manifest'}: not a Kubernetes object "
                           "with kind and metadata.name")
    return obj


def kubernetes_cluster(
    *,
    manifest: str | os.PathLike | dict | None = None,
    name: str | None = None,
    namespace: str | None = None,
    n_workers: int | None = None,
    adapt: tuple[int, int] | None = None,
    quiet: bool = False,
) -> Any:
    """A dask-kubernetes operator ``KubeCluster``: created from a DaskCluster manifest, or an existing one by name."""
    if (manifest is None) == (name is None):
        raise PzscaleError("kubernetes: pass either manifest= (a DaskCluster YAML such as "
                           "deployments/kubernetes/daskcluster.yaml) or name= (a running DaskCluster)")
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError as e:
        raise _missing_extra("a Kubernetes cluster", "k8s", e) from None
    spec = load_manifest(manifest) if manifest is not None else None
    if spec is not None and spec["kind"] != "DaskCluster":
        raise PzscaleError(f"{manifest}: a {spec['kind']}, not a DaskCluster; apply worker groups and autoscalers "
                           "with kubectl, or pass adapt=")
    try:
        if spec is not None:
            cluster = KubeCluster(custom_cluster_spec=spec, namespace=namespace, shutdown_on_close=True, quiet=quiet)
        else:
            cluster = KubeCluster.from_name(name, namespace=namespace, quiet=quiet)
    except (ValueError, OSError, TimeoutError) as e:
        where = spec["metadata"]["name"] if spec else name
        raise PzscaleError(f"kubernetes: cannot start or reach DaskCluster {where!r} ({type(e).__name__}: {e}); "
                           "check kubectl access (kubeconfig or service account) and the operator") from None
    if adapt:
        cluster.adapt(minimum=adapt[0], maximum=adapt[1])
    elif n_workers:
        cluster.scale(n_workers)
    return cluster


def gateway_cluster(
    *,
    address: str | None = None,
    name: str | None = None,
    options: dict | None = None,
    n_workers: int | None = None,
    adapt: tuple[int, int] | None = None,
) -> Any:
    """A dask-gateway cluster: an existing one by ``name``, else a new one with ``options``
    (see ``deployments/gateway/``: image, worker cores and memory, GPU)."""
    try:
        from dask_gateway import Gateway
    except ImportError as e:
        raise _missing_extra("a dask-gateway cluster", "k8s", e) from None
    gateway = Gateway(address) if address else Gateway()
    cluster = gateway.connect(name) if name else gateway.new_cluster(**(options or {}))
    if adapt:
        cluster.adapt(minimum=adapt[0], maximum=adapt[1])
    elif n_workers:
        cluster.scale(n_workers)
    return cluster
