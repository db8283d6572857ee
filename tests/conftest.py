"""Shared fixtures.

- ``client``: one distributed LocalCluster of 2 worker processes for the session.
- ``own_client``: the same, for one test (tests that kill workers).
- ``synth_dir``: a synthetic Planktonzilla collection (parquet + truth.json), made once.
- ``clean_catalog``: that collection ingested without interruption, and its checksums;
  the reference that interrupted, resumed and appended runs are compared with.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from distributed import Client, LocalCluster

from pzscale import catalog
from pzscale.ingest import ingest
from pzscale.synth import synth

SHARD_LEN = 64
N_IMAGES = 1200


@contextmanager
def _two_workers() -> Iterator[Client]:
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="session")
def client():
    with _two_workers() as c:
        yield c


@pytest.fixture
def own_client():
    """Two worker processes for one test: tests that kill workers use it, so that a worker that does
    not come back never leaves a later test short."""
    with _two_workers() as c:
        yield c


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth(out, images=N_IMAGES, seed=7, rows_per_file=500, row_group_size=100)
    return out


@pytest.fixture(scope="session")
def clean_catalog(synth_dir, client, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("clean") / "catalog.zarr")
    report = ingest([str(synth_dir)], url, shard_len=SHARD_LEN, client=client, progress=False)
    return url, report, catalog.checksums(url)


@pytest.fixture(scope="session")
def shared_data():
    """The real sample files in ../shared/data (beside the repository, in CI too)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: the shared sample data must sit beside the repository")
    return path
