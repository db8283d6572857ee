"""A worker process lost in the middle of a stage: the job completes, the catalog equals a clean
run's array by array, and a rerun skips every shard.

The worker is lost at the worst moment on purpose: ``faulty://`` ends the worker process
(``os._exit``) just before it writes a shard's done marker, after that shard's arrays. Its nanny
starts a new process and Dask runs the shard again elsewhere. (A SIGKILL at a random moment of an
ingest, and a whole CLI job killed, are in tests/test_resume.py.)

Each test has a cluster of its own (``own_client``): a nanny's restart can race with the scheduler, and a worker
that does not come back must not leave later tests with one worker.
"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from pzscale import catalog
from pzscale.classify import classify
from pzscale.embed import embed
from pzscale.ingest import ingest
from pzscale.ml import models
from tests.reliability.helpers import SHARD_LEN, image_ids

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(300)]  # a lost job fails, not hangs


def faulty(path) -> str:
    return f"faulty://{path}"


def crash_before_marker(stage: str, shard: int, log_dir) -> dict:
    return {"crash": [f"write:*/_pzscale/done/{stage}/*{shard:06d}.json"], "log_dir": str(log_dir),
            "only_in_workers": True}


def test_worker_lost_between_arrays_and_marker_mid_ingest(small_synth, small_clean, own_client, tmp_path, tally):
    _, clean_report, clean_sums, clean_ids = small_clean
    local = tmp_path / "cat.zarr"
    so = crash_before_marker("ingest/*", 3, tmp_path / "faults")
    report = ingest([str(small_synth)], faulty(local), shard_len=SHARD_LEN, client=own_client, progress=False,
                    storage_options=so)
    assert tally.add_faults(tmp_path / "faults") == {"crash": 1}
    assert report.shards_written == clean_report.shards_total and not report.failures
    assert catalog.checksums(str(local)) == clean_sums
    assert tally.check_rows(image_ids(str(local)), clean_ids) == (0, 0)
    again = ingest([str(small_synth)], str(local), client=own_client, progress=False)
    assert (again.shards_skipped, again.shards_written) == (clean_report.shards_total, 0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An untrained built-in CNN with a 3-class head: enough to check that outputs survive a lost worker."""
    torch.manual_seed(0)
    card = models.ModelCard(name="tiny", version="1", kind="builtin", architecture="pzcnn-small", embed_dim=16,
                            image_size=48, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                            classes=["animalia arthropoda copepoda", "chromista ochrophyta", "detritus"],
                            head="linear")
    out = tmp_path_factory.mktemp("tiny_model")
    models.save_model(out, card, models.builtin_backbone(16), models.make_head("linear", 16, 3))
    return str(out), card


def test_worker_lost_mid_embed_and_mid_classify(tiny_model, small_clean, own_client, tmp_path, tally):
    """One worker lost in each model stage (they share inference.run_model_shard)."""
    model_dir, card = tiny_model
    clean = str(tmp_path / "clean.zarr")
    shutil.copytree(small_clean[0], clean)
    for run in (embed, classify):
        run(clean, model_dir, client=own_client, progress=False)
    local = tmp_path / "cat.zarr"
    shutil.copytree(small_clean[0], local)
    so = crash_before_marker(f"embed/{card.id}", 2, tmp_path / "faults")
    so["crash"] += crash_before_marker(f"classify/{card.id}", 3, tmp_path / "faults")["crash"]
    reports = [run(faulty(local), model_dir, client=own_client, progress=False, storage_options=so)
               for run in (embed, classify)]  # the second stage starts while the first lost worker restarts
    assert tally.add_faults(tmp_path / "faults") == {"crash": 2}
    for report in reports:
        assert report.shards_written == report.shards_total and not report.failures
    sums = catalog.checksums(str(local))
    assert {name.split("__")[0] for name in sums} >= {"emb", "pred"}
    assert sums == catalog.checksums(clean)
    assert tally.check_rows(image_ids(str(local)), small_clean[3]) == (0, 0)
    for run in (embed, classify):
        again = run(str(local), model_dir, client=own_client, progress=False)
        assert (again.shards_skipped, again.shards_written) == (again.shards_total, 0)


def test_worker_lost_mid_dedup(small_clean, own_client, tmp_path, tally):
    """Lost once before a hash-pass marker, and once while the exact-duplicate shuffle reads the pixel hashes."""
    from pzscale.dedup import dedup, read_report

    clean = str(tmp_path / "clean.zarr")
    shutil.copytree(small_clean[0], clean)
    dedup(clean, client=own_client, progress=False)
    local = tmp_path / "cat.zarr"
    shutil.copytree(small_clean[0], local)
    so = crash_before_marker("dedup_hash", 2, tmp_path / "faults")
    so["crash"].append("read:*/pixel_hash/c/1*")  # (rows, 2) uint64: keys c/<shard>/0
    report = dedup(faulty(local), client=own_client, progress=False, storage_options=so)
    assert tally.add_faults(tmp_path / "faults") == {"crash": 2}
    assert report.hash_stage.shards_written == report.hash_stage.shards_total
    sums = catalog.checksums(str(local))
    assert {"dup_exact", "dup_near", "dup_keep", "pixel_hash", "phash"} <= set(sums)
    assert sums == catalog.checksums(clean)
    for name in ("exact_pairs", "near_pairs"):
        pd.testing.assert_frame_equal(read_report(str(local), name), read_report(clean, name))
    assert tally.check_rows(image_ids(str(local)), small_clean[3]) == (0, 0)
    again = dedup(str(local), client=own_client, progress=False)
    assert again.hash_stage.shards_skipped == again.hash_stage.shards_total


def test_worker_lost_mid_env(small_clean, own_client, tmp_path, tally):
    from pzscale import grids
    from pzscale.env import env

    grid = grids.synthetic_grid(str(tmp_path / "grid.nc"), resolution=4.0, months=48)
    clean = str(tmp_path / "clean.zarr")
    shutil.copytree(small_clean[0], clean)
    env(clean, grid, ["sst"], client=own_client, progress=False)
    local = tmp_path / "cat.zarr"
    shutil.copytree(small_clean[0], local)
    so = crash_before_marker("env/sst", 2, tmp_path / "faults")
    report = env(faulty(local), grid, ["sst"], client=own_client, progress=False, storage_options=so)
    assert tally.add_faults(tmp_path / "faults") == {"crash": 1}
    assert report.shards_written == report.shards_total and not report.failures
    sums = catalog.checksums(str(local))
    assert {"env_sst", "env_sst_qc"} <= set(sums) and sums == catalog.checksums(clean)
    assert tally.check_rows(image_ids(str(local)), small_clean[3]) == (0, 0)
    again = env(str(local), grid, ["sst"], client=own_client, progress=False)
    assert (again.shards_skipped, again.shards_written) == (report.shards_total, 0)
