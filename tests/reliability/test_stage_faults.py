"""Every stage on throttling storage: 30% of (operation, path) pairs fail once, in the workers and on the
client alike, and the stage ends with the catalog (and outputs) of the same run on clean storage.

Each test copies one small catalog twice, runs the stage on the plain path and on ``faulty://`` with
``FAULTS``, and compares every array's checksum; the faults must really have been injected, on the
client's metadata requests too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from typer.testing import CliRunner

from pzscale import catalog, grids
from pzscale.abundance import abundance
from pzscale.classify import classify
from pzscale.cli import app
from pzscale.dedup import dedup, duplicate_pairs
from pzscale.dwc import export_dwc
from pzscale.embed import embed
from pzscale.env import env
from pzscale.evaluate import evaluate
from pzscale.ingest import ingest
from pzscale.ml import models
from pzscale.split import assign_splits
from tests.reliability.helpers import SHARD_LEN

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def faults_in(log: Path, seed: int = 0) -> dict:
    """30% of (operation, path) pairs fail once: a timeout, a reset connection or SlowDown."""
    return {"fail_rate": 0.3, "fail_times": 1, "timeout_s": 0.01, "log_dir": str(log), "seed": seed}


def faulty(path: Path) -> str:
    return f"faulty://{path}"


@pytest.fixture(scope="module")
def labelled(small_clean, tmp_path_factory):
    """The small reliability catalog with a split and class predictions of an untrained model."""
    url = str(tmp_path_factory.mktemp("stage_faults") / "cat.zarr")
    shutil.copytree(small_clean[0], url)
    assign_splits(url, seed=3)
    return url


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, labelled) -> str:
    """A small built-in CNN with a head over the catalog's lineages (weights seeded, not trained)."""
    torch.manual_seed(0)
    classes = sorted(set(catalog.open_group(labelled)["lineage"][:].tolist()) - {""})
    card = models.ModelCard(name="fault-drill", version="1", kind="builtin", architecture=models.BUILTIN_ARCHITECTURE,
                            embed_dim=16, image_size=48, mean=(0.5,) * 3, std=(0.25,) * 3, classes=classes,
                            head="linear")
    out = tmp_path_factory.mktemp("fault_model")
    models.save_model(out, card, models.builtin_backbone(16).eval(), models.make_head("linear", 16, len(classes)))
    return str(out)


@pytest.fixture
def pair(labelled, tmp_path, fast_backoff):
    """(clean path, faulty URL, storage options, fault log) of two copies of the labelled catalog."""
    clean, disturbed = tmp_path / "clean.zarr", tmp_path / "faulty.zarr"
    shutil.copytree(labelled, clean)
    shutil.copytree(labelled, disturbed)
    log = tmp_path / "faults"
    return str(clean), faulty(disturbed), faults_in(log), log


def assert_same_catalog(clean: str, disturbed: str, log: Path, tally) -> None:
    injected = tally.add_faults(log)
    assert sum(injected.values()) >= 5, injected
    assert catalog.checksums(clean) == catalog.checksums(disturbed.removeprefix("faulty://"))


def test_ingest_on_faulty_storage(small_synth, small_clean, client, tmp_path, fast_backoff, tally):
    log = tmp_path / "faults"
    so = faults_in(log)
    url = faulty(tmp_path / "cat.zarr")
    report = ingest([faulty(small_synth)], url, shard_len=SHARD_LEN, client=client, progress=False,
                    storage_options=so)
    assert not report.failures and report.status == small_clean[1].status
    assert_same_catalog(small_clean[0], url, log, tally)
    # the client's own requests (plan, lock, metadata) met faults too, and were retried
    assert any(p.read_text().endswith(f"pid={os.getpid()}") for p in log.iterdir())


def test_split_on_faulty_storage(pair, client, tally):
    clean, url, so, log = pair
    expected = assign_splits(clean, seed=9, client=client)
    assert assign_splits(url, seed=9, storage_options=so, client=client) == expected
    assert_same_catalog(clean, url, log, tally)
    assert catalog.done_shards(url.removeprefix("faulty://"), "split") == set(range(5))


def test_embed_and_classify_on_faulty_storage(pair, model_dir, client, tally):
    clean, url, so, log = pair
    for stage in (embed, classify):
        stage(clean, model_dir, client=client, progress=False)
        report = stage(url, model_dir, client=client, progress=False, storage_options=so)
        assert report.shards_written == 5 and not report.failures
    assert_same_catalog(clean, url, log, tally)
    card = models.ModelCard.load(model_dir)
    pd.testing.assert_frame_equal(evaluate(url, card.id, split="train", storage_options=so, client=client),
                                  evaluate(clean, card.id, split="train", client=client))


def test_dedup_on_faulty_storage(pair, client, tally):
    clean, url, so, log = pair
    expected = dedup(clean, methods=("exact", "near"), client=client, progress=False)
    report = dedup(url, methods=("exact", "near"), client=client, progress=False, storage_options=so)
    assert report.kept == expected.kept and report.per_method.keys() == expected.per_method.keys()
    assert_same_catalog(clean, url, log, tally)
    pd.testing.assert_frame_equal(duplicate_pairs(url, storage_options=so), duplicate_pairs(clean))


def test_env_on_faulty_storage(pair, client, tmp_path, tally):
    clean, url, so, log = pair
    grid = grids.synthetic_grid(tmp_path / "grid.nc", resolution=10.0, months=24)
    env(clean, str(grid), ["sst", "so"], client=client, progress=False)
    report = env(url, str(grid), ["sst", "so"], client=client, progress=False, storage_options=so)
    assert report.shards_written == 5
    assert_same_catalog(clean, url, log, tally)


def test_abundance_and_darwin_core_on_faulty_storage(pair, client, tmp_path, tally):
    clean, url, so, log = pair
    expected = abundance(clean, rank="genus", cell_deg=20.0, client=client)
    counted = abundance(url, rank="genus", cell_deg=20.0, storage_options=so, client=client)
    assert int(expected["count"].sum()) > 0
    xr.testing.assert_equal(counted, expected)
    out_clean, out_faulty = tmp_path / "clean.csv", tmp_path / "faulty.csv"
    assert export_dwc(clean, str(out_clean), client=client)["rows"] > 0
    export_dwc(url, faulty(out_faulty), storage_options=so, out_storage_options=so, client=client)
    assert out_faulty.read_bytes() == out_clean.read_bytes()
    assert sum(tally.add_faults(log).values()) >= 5


def test_the_cli_takes_faulty_urls_for_the_same_drill(small_synth, small_clean, tmp_path, fast_backoff, tally):
    """Any registered fsspec protocol works from the command line: the drill as an operator would run it."""
    log = tmp_path / "faults"
    so = faults_in(log, seed=5)
    url = faulty(tmp_path / "cat.zarr")
    result = CliRunner().invoke(app, ["ingest", faulty(small_synth), "--catalog", url, "--shard-len",
                                      str(SHARD_LEN), "--workers", "1", "--storage-options", json.dumps(so)])
    assert result.exit_code == 0, result.output
    assert_same_catalog(small_clean[0], url, log, tally)
    counts = np.unique(catalog.open_group(str(tmp_path / "cat.zarr"))["status"][:], return_counts=True)
    assert dict(zip(*counts, strict=True)) == small_clean[1].status


def test_the_command_line_checks_retry_storage_faults(small_clean, small_synth, tmp_path, fast_backoff):
    """Every request of the checks made before a cluster starts fails once: none is taken for a usage error."""
    from pzscale.commandline import check_inputs

    so = {**faults_in(tmp_path / "faults"), "fail_rate": 1.0}
    check_inputs(faulty(Path(small_clean[0])), so, sources=[faulty(small_synth)])
