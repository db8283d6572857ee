"""Interrupted ingests: a worker process killed mid-run, and the whole job killed mid-run.

Either way the finished catalog must equal an uninterrupted run's, array by array, and a
rerun must skip the shards that were already marked done.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pzscale import catalog
from pzscale.ingest import ingest, make_plan
from tests.conftest import SHARD_LEN

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _wait_for(predicate, timeout=120.0, every=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def test_worker_killed_mid_ingest_gives_identical_catalog(synth_dir, clean_catalog, own_client, tmp_path):
    _, clean_report, clean_sums = clean_catalog
    url = str(tmp_path / "cat.zarr")
    stage = f"ingest/{make_plan([str(synth_dir)], shard_len=SHARD_LEN).id}"
    pids = own_client.run(os.getpid)
    result, errors = [], []

    def run():
        try:
            result.append(ingest([str(synth_dir)], url, shard_len=SHARD_LEN, client=own_client, progress=False))
        except Exception as e:  # surfaced below
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    assert _wait_for(lambda: len(catalog.done_shards(url, stage)) >= 1)
    busy = [addr for addr, keys in own_client.processing().items() if keys] or list(pids)
    done_at_kill = len(catalog.done_shards(url, stage))
    os.kill(pids[busy[0]], signal.SIGKILL)
    thread.join(timeout=300)
    assert not errors, errors
    assert done_at_kill < clean_report.shards_total, "the kill came after the ingest had finished"
    assert result[0].shards_written == clean_report.shards_total
    assert catalog.checksums(url) == clean_sums


def test_killed_job_resumes_and_skips_finished_shards(synth_dir, clean_catalog, client, tmp_path):
    _, clean_report, clean_sums = clean_catalog
    url = str(tmp_path / "cat.zarr")
    stage = f"ingest/{make_plan([str(synth_dir)], shard_len=SHARD_LEN).id}"
    cmd = [sys.executable, "-m", "pzscale.cli", "ingest", str(synth_dir), "--catalog", url,
           "--shard-len", str(SHARD_LEN), "--workers", "1"]
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert _wait_for(lambda: len(catalog.done_shards(url, stage)) >= 3, every=0.002)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the CLI, its scheduler and its worker, all at once
        job.wait()
    done = catalog.done_shards(url, stage)
    assert 3 <= len(done) < clean_report.shards_total, "the job was not interrupted mid-run"
    report = ingest([str(synth_dir)], url, client=client, progress=False)
    assert report.shards_skipped == len(done)
    assert report.shards_written == clean_report.shards_total - len(done)
    assert catalog.checksums(url) == clean_sums
