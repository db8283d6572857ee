"""Dask clients: a local cluster of worker processes by default, or an existing scheduler."""

from __future__ import annotations

import os

from distributed import Client


def connect(
    address: str | None = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | int = "auto",
    cuda: bool = False,
    quiet: bool = False,
) -> Client:
    """A Dask client for pzscale stages.

    With ``address`` (``tcp://host:8786``) connect to a running scheduler. Without, start a
    LocalCluster of worker *processes*, one per core and one thread each: decoding and
    encoding images holds the GIL, so threads would not scale. With ``cuda``, a dask-cuda
    LocalCUDACluster: one worker per GPU, each advertising the resource ``GPU=1`` that the
    model stages ask for (dask-cuda adds no such resource by itself).
    """
    if address:
        client = Client(address)
    elif cuda:
        client = Client(local_cuda_cluster(memory_limit=memory_limit))
    else:
        # The client owns the LocalCluster it starts here, so closing the client stops it.
        client = Client(
            n_workers=n_workers or os.cpu_count() or 1,
            threads_per_worker=threads_per_worker,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address="127.0.0.1:0",  # local only; never exposed on other interfaces
        )
    if not quiet:
        workers = len(client.scheduler_info(n_workers=-1)["workers"])
        print(f"dask: {workers} worker(s), dashboard {client.dashboard_link}")
    return client


def local_cuda_cluster(**kwargs: object) -> object:
    """A dask-cuda LocalCUDACluster with ``GPU=1`` per worker; dask-cuda is imported only here."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as e:
        from pzscale.errors import PzscaleError

        raise PzscaleError(f"a CUDA cluster needs dask-cuda and a GPU (pip install 'pzscale[gpu]'): {e}") from None
    return LocalCUDACluster(threads_per_worker=1, resources={"GPU": 1}, dashboard_address="127.0.0.1:0", **kwargs)
