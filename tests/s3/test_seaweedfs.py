"""Concurrency, create-only markers, crash recovery and credentials on a real S3 server (SeaweedFS).

SeaweedFS enforces credentials and ``If-None-Match: *``, which moto does not (or not in the
same way), so these run against ``weed mini`` on 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import s3fs

from pzscale import catalog
from pzscale.errors import CatalogError, ShardAlignmentError
from pzscale.ingest import STAGE, ingest, ingest_shard, make_plan
from pzscale.stage import Catalog, ShardTask, run_task
from tests.conftest import SHARD_LEN
from tests.s3.conftest import N_IMAGES

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
N_SHARDS = -(-N_IMAGES // SHARD_LEN)


@pytest.fixture(scope="module")
def weed_catalog(seaweedfs, s3_synth, client):
    """The small collection ingested into SeaweedFS by the session's two worker processes."""
    url = seaweedfs.url("weed/catalog.zarr")
    report = ingest([str(s3_synth)], url, shard_len=SHARD_LEN, client=client, progress=False,
                    storage_options=seaweedfs.options())
    return url, report


def _write_shard_at(url: str, shard: int, value: int, start_at: float, so: dict) -> tuple[float, float]:
    """Wait until ``start_at`` (so the writers overlap), then write one whole shard of ``probe``."""
    time.sleep(max(0.0, start_at - time.time()))
    group = catalog.open_group(url, mode="r+", storage_options=so, check=False)
    started = time.time()
    catalog.write_arrays(group, shard * SHARD_LEN, min((shard + 1) * SHARD_LEN, N_IMAGES),
                         {"probe": np.full(min(SHARD_LEN, N_IMAGES - shard * SHARD_LEN), value, np.int64)})
    return started, time.time()


def _mark_at(url: str, stage: str, shard: int, attempt: int, start_at: float, so: dict) -> bool:
    time.sleep(max(0.0, start_at - time.time()))
    return catalog.mark_done(url, stage, shard, {"rows": [0, 1], "attempt": attempt}, storage_options=so)


def test_two_writers_on_disjoint_shards_lose_nothing(weed_catalog, seaweedfs, s3_reference, client):
    url, report = weed_catalog
    so = seaweedfs.options()
    assert report.shards_written == N_SHARDS
    assert catalog.checksums(url, storage_options=so) == s3_reference[1]
    group = catalog.open_group(url, mode="r+", storage_options=so)
    catalog.ensure_array(group, "probe", dtype="int64", fill=-1)
    client.wait_for_workers(2, timeout=60)  # the test needs both workers
    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    assert len(workers) == 2
    overlapped = 0
    for round_ in range(3):
        start_at = time.time() + 1.0
        # shard i goes to worker i % 2: two processes write disjoint shards of one array at once
        futures = [client.submit(_write_shard_at, url, shard, round_ * 100 + shard, start_at, so,
                                 workers=[workers[shard % 2]], pure=False) for shard in range(N_SHARDS)]
        (start_0, end_0), (start_1, end_1), *_ = client.gather(futures)
        overlapped += max(start_0, start_1) < min(end_0, end_1)
        expected = np.repeat(round_ * 100 + np.arange(N_SHARDS), SHARD_LEN)[:N_IMAGES]
        np.testing.assert_array_equal(group["probe"][:], expected)
    assert overlapped, "the two writers never wrote at the same time"
    # the guard that makes this safe: a write into part of a shard is refused before any PUT
    with pytest.raises(ShardAlignmentError, match="not whole shards"):
        catalog.write_arrays(group, 0, SHARD_LEN // 2, {"probe": np.zeros(SHARD_LEN // 2, np.int64)})


def _check_create_only_markers(url: str, so: dict | None) -> None:
    def marked(attempt: int, rows: list[int], **kwargs) -> bool:
        return catalog.mark_done(url, "probe-stage", 0, {"rows": rows, "attempt": attempt}, storage_options=so,
                                 **kwargs)

    def marker() -> dict:
        return catalog.marker_infos(url, "probe-stage", storage_options=so)[0]

    assert marked(1, [0, 40]) is True
    assert marked(2, [0, 40]) is False  # the same rows: done by the first attempt, which stays
    assert marker()["attempt"] == 1
    assert marked(3, [0, 64]) is True  # more rows (after an append) supersede the old marker
    assert marker() == {"stage": "probe-stage", "shard": 0, "pzscale": marker()["pzscale"], "rows": [0, 64],
                        "attempt": 3}
    assert marked(4, [0, 64], replace=True) is True and marker()["attempt"] == 4


def test_a_second_done_marker_fails_cleanly(weed_catalog, seaweedfs, s3_synth, client, tmp_path):
    url, _ = weed_catalog
    so = seaweedfs.options()
    _check_create_only_markers(url, so)  # If-None-Match: * on SeaweedFS
    _check_create_only_markers(str(tmp_path / "local.zarr"), None)  # O_EXCL on local disk

    # two workers race to mark the same shards: exactly one wins each, and its marker stays
    client.wait_for_workers(2, timeout=60)
    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    start_at = time.time() + 1.0
    futures = {(shard, attempt): client.submit(_mark_at, url, "race", shard, attempt, start_at, so,
                                               workers=[workers[attempt]], pure=False)
               for shard in range(4) for attempt in (0, 1)}
    won = {key: f.result() for key, f in futures.items()}
    infos = catalog.marker_infos(url, "race", storage_options=so)
    for shard in range(4):
        assert won[shard, 0] != won[shard, 1], f"shard {shard}: {won[shard, 0]} and {won[shard, 1]}"
        assert infos[shard]["attempt"] == (0 if won[shard, 0] else 1)

    # a second attempt of a finished ingest shard completes as done-by-another-attempt
    plan = make_plan([str(s3_synth)], shard_len=SHARD_LEN)
    shard = plan.shard_tasks()[1]
    task = ShardTask(Catalog.open(url, so), f"{STAGE}/{plan.id}", 1, SHARD_LEN, shard["stop"], shard["start"],
                     {"plan": plan.id, "taxonomy": None, "taxonomy_source": None, "limits": None,
                      "segments": shard["segments"], "duplicate_ids": "flag"})
    first = {**catalog.marker_infos(url, task.stage, storage_options=so)[1], "attempt": "first"}
    catalog.mark_done(url, task.stage, 1, first, storage_options=so, replace=True)  # tag the first attempt's
    assert client.submit(run_task, ingest_shard, task, pure=False).result()["rows"] == SHARD_LEN
    assert catalog.marker_infos(url, task.stage, storage_options=so)[1] == first  # kept, not overwritten


def test_a_shard_rewritten_after_a_crash(weed_catalog, seaweedfs, s3_synth, s3_reference, client):
    """A crashed attempt left shard 1's arrays half rewritten and no marker: the rerun redoes that shard only."""
    url, _ = weed_catalog
    so = seaweedfs.options()
    stage = f"{STAGE}/{make_plan([str(s3_synth)], shard_len=SHARD_LEN).id}"
    group = catalog.open_group(url, mode="r+", storage_options=so)
    rows = slice(SHARD_LEN, 2 * SHARD_LEN)
    catalog.write_arrays(group, rows.start, rows.stop, {  # what the crashed attempt's first PUTs left
        "lat": np.zeros(SHARD_LEN), "image_id": np.full(SHARD_LEN, "crashed", dtype=object)})
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **so)
    fs.rm(f"{url.removeprefix('s3://')}/_pzscale/done/{stage}/000001.json")
    assert catalog.done_shards(url, stage, storage_options=so) == set(range(N_SHARDS)) - {1}
    assert catalog.checksums(url, storage_options=so)["image_id"] != s3_reference[1]["image_id"]

    report = ingest([str(s3_synth)], url, client=client, progress=False, storage_options=so)
    assert (report.shards_written, report.shards_skipped) == (1, N_SHARDS - 1)
    assert catalog.done_shards(url, stage, storage_options=so) == set(range(N_SHARDS))
    sums = catalog.checksums(url, storage_options=so)
    assert {name: sums[name] for name in s3_reference[1]} == s3_reference[1]


def _cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    return subprocess.run([sys.executable, "-m", "pzscale.cli", *args], env={**clean, **env}, capture_output=True,
                          text=True, timeout=120)


def test_wrong_secret_gives_a_clear_error_without_the_secret(weed_catalog, seaweedfs):
    url, _ = weed_catalog
    wrong = "pz-wrong-secret-0c55e1"
    with pytest.raises(CatalogError, match="access denied; check the credentials") as error:
        catalog.open_group(url, storage_options=seaweedfs.options(secret=wrong))
    assert wrong not in str(error.value) and seaweedfs.secret not in str(error.value)
    with pytest.raises(CatalogError, match="access denied"):
        ingest(["unused"], seaweedfs.url("weed/other.zarr"), storage_options=seaweedfs.options(secret=wrong))

    # the CLI with credentials from the environment only, as the docs recommend
    env = {"AWS_ACCESS_KEY_ID": seaweedfs.key, "AWS_ENDPOINT_URL": seaweedfs.endpoint}
    failed = _cli(["info", url], {**env, "AWS_SECRET_ACCESS_KEY": wrong})
    assert failed.returncode == 1
    assert "access denied; check the credentials" in failed.stderr and "Traceback" not in failed.stderr
    assert wrong not in failed.stdout + failed.stderr
    ok = _cli(["info", url, "--json"], {**env, "AWS_SECRET_ACCESS_KEY": seaweedfs.secret})
    assert ok.returncode == 0, ok.stderr
    assert f'"rows": {N_IMAGES}' in ok.stdout
    assert seaweedfs.secret not in ok.stdout + ok.stderr
