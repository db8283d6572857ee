"""Shared fixtures.

- ``client``: one distributed LocalCluster of 2 worker processes for the session.
- ``own_client``: the same, for one test (tests that kill workers).
- ``synth_dir``: a synthetic Planktonzilla collection (parquet + truth.json), made once.
- ``clean_catalog``: that collection ingested without interruption, and its checksums;
  the reference that interrupted, resumed and appended runs are compared with.
- ``one_torch_thread``: torch on one thread in this process (``pytest.mark.usefixtures`` per module).
- ``independent_macro_f1``: macro-F1 per rank from per-class counts, the oracle for the scorers.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import Client, LocalCluster

from pzscale import catalog
from pzscale.ingest import ingest
from pzscale.synth import synth, synth_ifcb

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


@pytest.fixture
def cat_url(clean_catalog, tmp_path) -> str:
    """A copy of the clean catalog that a test may change or damage."""
    url = str(tmp_path / "cat.zarr")
    shutil.copytree(clean_catalog[0], url)
    return url


SAMPLE_DATA = Path(__file__).resolve().parent / "data"
ARCHITECTURE = Path(__file__).resolve().parents[1] / "ARCHITECTURE.md"


def architecture_example() -> dict:
    """The namespace of ARCHITECTURE.md's "how to add a stage" block, run as written (``image_area``)."""
    code = re.search(r"```python\n(.*?)```", ARCHITECTURE.read_text(), re.S).group(1)
    namespace: dict = {"__name__": "architecture_example"}
    exec(compile(code, str(ARCHITECTURE), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """Real files written by other tools, kept in the repository (tests/data, provenance and licence
    in each folder's SOURCE.txt) so that a clone alone runs the suite."""
    return SAMPLE_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Train and infer in this process on one thread: the tiny models gain nothing from more, and on a
    shared, busy machine spinning OpenMP threads slow them down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def independent_macro_f1(truth, predicted, depth):
    """Macro-F1 at rank ``depth`` from per-class counts: lineages cut to their first ``depth`` words."""
    t = np.array([" ".join(s.split()[:depth]) for s in truth], dtype=object)
    p = np.array([" ".join(s.split()[:depth]) for s in predicted], dtype=object)
    per_class = []
    for label in sorted(set(t) | set(p)):
        tp = np.sum((t == label) & (p == label))
        fp = np.sum((t != label) & (p == label))
        fn = np.sum((t == label) & (p != label))
        per_class.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(per_class))


def parquet_and_ifcb_catalog(work: Path, client, *, images: int, seed: int, ifcb_images: int, rois_per_bin: int
                             ) -> str:
    """A catalog of synthetic Planktonzilla rows (shards of 64) with a synthetic IFCB cruise appended as source
    ``cruise_ifcb`` (volumes and bins known); its URL."""
    url = str(work / "catalog.zarr")
    synth(work / "parquet", images=images, seed=seed, rows_per_file=images)
    ingest([str(work / "parquet")], url, shard_len=64, client=client, progress=False)
    synth_ifcb(work / "ifcb", images=ifcb_images, seed=4, rois_per_bin=rois_per_bin)
    ingest([str(work / "ifcb")], url, format="ifcb", source="cruise_ifcb", append=True, client=client,
           progress=False)
    return url
