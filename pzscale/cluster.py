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
    quiet: bool = False,
) -> Client:
    """A Dask client for pzscale stages.

    With ``address`` (``tcp://host:8786``) connect to a running scheduler. Without, start a
    LocalCluster of worker *processes*, one per core and one thread each: decoding and
    encoding images holds the GIL, so threads would not scale.
    """
    if address:
        client = Client(address)
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
