"""Storage that times out, throttles, refuses or loses a write, and catalogs written by two clients.

Faults come from ``faulty://`` (``pzscale.faults.FaultyFileSystem``): the same fsspec path a stage
takes to s3://, with failures injected inside the worker processes. Every disturbed run must end
equal to an undisturbed one, array by array, or fail with a clear message and no done marker
for what it did not finish.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import threading

import numpy as np
import pytest

from pzscale import catalog, progress
from pzscale.errors import CatalogError, InputError, StageError
from pzscale.faults import is_transient
from pzscale.ingest import ingest, make_plan, metadata_lock, read_lock
from pzscale.synth import synth
from tests.reliability.helpers import SHARD_LEN, image_ids

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def faulty(path) -> str:
    return f"faulty://{path}"


def _stage(sources) -> str:
    return f"ingest/{make_plan([str(s) for s in sources], shard_len=SHARD_LEN).id}"


def _check_same_rows(tally, url, expected_ids, storage_options=None):
    lost, duplicated = tally.check_rows(image_ids(url, storage_options), expected_ids)
    assert (lost, duplicated) == (0, 0)


# ---------------------------------------------------------------- transient faults


def test_transient_faults_in_workers_give_the_clean_catalog(small_synth, small_clean, client, tmp_path,
                                                            fast_backoff, tally):
    """Inputs and catalog behind faulty://: 5% of requests time out, reset or get SlowDown, once each."""
    _, clean_report, clean_sums, clean_ids = small_clean
    log = tmp_path / "faults"
    so = {"fail_rate": 0.05, "log_dir": str(log), "only_in_workers": True, "seed": 1}
    url = faulty(tmp_path / "cat.zarr")
    report = ingest([faulty(small_synth)], url, shard_len=SHARD_LEN, client=client, progress=False,
                    storage_options=so)
    injected = tally.add_faults(log)
    assert sum(injected.values()) >= 10 and set(injected) == {"timeout", "reset", "slowdown"}, injected
    assert report.shards_written == clean_report.shards_total and not report.failures
    assert report.status == clean_report.status
    assert catalog.checksums(str(tmp_path / "cat.zarr")) == clean_sums
    _check_same_rows(tally, url, clean_ids, so)
    again = ingest([faulty(small_synth)], url, client=client, progress=False, storage_options=so)
    assert again.shards_skipped == clean_report.shards_total and again.shards_written == 0


def _class_tree(sample_data, root, copies: int = 4):
    """PNGs in 3 class folders: the real IFCB PNGs of the samples, ``copies`` times under other names
    (3 x 3 x copies images); the collection is named after ``root``."""
    pngs = sorted([*(sample_data / "irfcb/test_data").glob("png*/*/*.png"),
                   *(sample_data / "classipyr/test_data/example_png").glob("*/*.png")])
    for label in ("Ciliophora", "Cryptomonadales", "Mesodinium_rubrum"):
        for copy in range(copies):
            for png in pngs:
                dest = root / "imgs" / label / f"{copy}_{png.name}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(png, dest)
    return root


def test_transient_faults_never_become_missing_images(sample_data, client, tmp_path, fast_backoff, tally):
    """Readers that mark a missing image per row (class folders, EcoTaxa folders) must not take a timeout
    for a missing file: the shard is retried and every image arrives."""
    tree = _class_tree(sample_data, tmp_path / "tree")
    tables = tmp_path / "m106"
    shutil.copytree(sample_data / "ecotaxa_back/import_test/m106_mn01_n1_sml", tables)
    clean = str(tmp_path / "clean.zarr")
    ingest([str(tree), str(tables)], clean, shard_len=SHARD_LEN, client=client, progress=False)
    log = tmp_path / "faults"
    # only image reads fail: any other fault would rerun the shard task and hide a swallowed one
    so = {"fail_rate": 0.3, "fail_on": ["read:*.png", "read:*.jpg"], "log_dir": str(log), "only_in_workers": True,
          "seed": 2}
    url = faulty(tmp_path / "cat.zarr")
    report = ingest([faulty(tree), faulty(tables)], url, shard_len=SHARD_LEN, client=client, progress=False,
                    storage_options=so)
    injected = tally.add_faults(log)
    assert sum(injected.values()) >= 5, injected
    status = open_status(str(tmp_path / "cat.zarr"))
    assert report.status == {"ok": len(status)} and (status == "ok").all()
    assert catalog.checksums(str(tmp_path / "cat.zarr")) == catalog.checksums(clean)
    _check_same_rows(tally, url, image_ids(clean), so)


def open_status(url):
    return catalog.open_group(url)["status"][:]


# ---------------------------------------------------------------- faults that do not go away


def test_permanent_error_fails_clearly_and_leaves_no_marker(small_synth, small_clean, client, tmp_path,
                                                            fast_backoff, tally):
    _, clean_report, clean_sums, clean_ids = small_clean
    log = tmp_path / "faults"
    local = tmp_path / "cat.zarr"
    so = {"permanent": ["write:*/lat/c/2"], "log_dir": str(log), "only_in_workers": True}
    with pytest.raises(StageError) as failed:
        ingest([str(small_synth)], faulty(local), shard_len=SHARD_LEN, client=client, progress=False,
               storage_options=so)
    tally.add_faults(log)
    message = str(failed.value)
    assert "1 shard(s) failed" in message and "shard 2: PermissionError" in message
    assert f"injected permanent fault: write {local}/lat/c/2" in message
    stage = _stage([small_synth])
    assert catalog.done_shards(str(local), stage) == set(range(clean_report.shards_total)) - {2}
    report = ingest([str(small_synth)], str(local), client=client, progress=False)
    assert (report.shards_written, report.shards_skipped) == (1, clean_report.shards_total - 1)
    assert catalog.checksums(str(local)) == clean_sums
    _check_same_rows(tally, str(local), clean_ids)


def test_storage_that_never_recovers_gives_up_after_the_backoff(small_synth, client, tmp_path, monkeypatch, tally):
    monkeypatch.setattr(progress, "DEFAULT_BACKOFF", progress.Backoff(attempts=3, base_s=0.005, max_s=0.02))
    log = tmp_path / "faults"
    local = tmp_path / "cat.zarr"
    so = {"fail_rate": 1.0, "fail_times": 10**6, "timeout_s": 0.01, "log_dir": str(log), "only_in_workers": True}
    with pytest.raises(StageError) as failed:
        ingest([str(small_synth)], faulty(local), shard_len=SHARD_LEN, client=client, progress=False,
               storage_options=so)
    injected = tally.add_faults(log)
    message = str(failed.value)
    assert "5 shard(s) failed" in message and message.count("gave up after 3 attempts") == 5
    # 3 attempts with backoff, in each of the 3 runs Dask gives a failing task (retries=2)
    assert sum(injected.values()) == 5 * 3 * 3
    assert catalog.done_shards(str(local), _stage([small_synth])) == set()


def test_crash_between_arrays_and_marker_is_rewritten_on_rerun(small_synth, small_clean, client, tmp_path,
                                                               fast_backoff, tally):
    """The marker of shard 2 cannot be written: its arrays are there but it is not done. Whatever those
    arrays then hold (here: overwritten with garbage), the rerun writes that shard again."""
    _, clean_report, clean_sums, clean_ids = small_clean
    log = tmp_path / "faults"
    local = tmp_path / "cat.zarr"
    so = {"permanent": ["write:*/_pzscale/done/ingest/*/000002.json"], "log_dir": str(log), "only_in_workers": True}
    with pytest.raises(StageError, match="shard 2: PermissionError"):
        ingest([str(small_synth)], faulty(local), shard_len=SHARD_LEN, client=client, progress=False,
               storage_options=so)
    tally.add_faults(log)
    group = catalog.open_group(str(local), mode="r+")
    rows = slice(2 * SHARD_LEN, 3 * SHARD_LEN)
    np.testing.assert_array_equal(group["image_id"][rows], clean_ids[rows])  # written, but not marked done
    assert 2 not in catalog.done_shards(str(local), _stage([small_synth]))
    catalog.write_arrays(group, rows.start, rows.stop, {"lat": np.full(SHARD_LEN, 89.0),
                                                        "image_id": np.full(SHARD_LEN, "torn", dtype=object)})
    report = ingest([str(small_synth)], str(local), client=client, progress=False)
    assert (report.shards_written, report.shards_skipped) == (1, clean_report.shards_total - 1)
    assert catalog.checksums(str(local)) == clean_sums
    _check_same_rows(tally, str(local), clean_ids)


# ---------------------------------------------------------------- two clients, one catalog


def test_ingest_while_another_holds_the_catalog_is_refused(small_clean, client, tmp_path):
    url = str(tmp_path / "cat.zarr")
    shutil.copytree(small_clean[0], url)
    cruise = tmp_path / "cruise"
    synth(cruise, images=40, seed=21)
    before = catalog.metadata(catalog.open_group(url))
    with metadata_lock(url), pytest.raises(CatalogError, match=r"another ingest is changing this catalog \(.* pid "):
        ingest([str(cruise)], url, append=True, client=client, progress=False)
    assert catalog.metadata(catalog.open_group(url)) == before
    report = ingest([str(cruise)], url, append=True, client=client, progress=False)  # the lock is gone
    assert report.rows == (len(small_clean[3]), len(small_clean[3]) + 40)


def _lock_of(url, **holder) -> None:
    """Write the ingest lock as an ingest of ``holder`` would have left it."""
    from pzscale.ingest import LOCK_SUFFIX

    with open(url.rstrip("/") + LOCK_SUFFIX, "w") as fh:
        json.dump({"since": "2026-01-01T00:00:00+00:00", "token": "theirs", **holder}, fh)


def test_a_lock_left_by_a_killed_ingest_of_this_host_is_taken_over(small_clean, client, tmp_path, caplog,
                                                                   monkeypatch):
    import logging
    import socket
    import subprocess
    import sys

    url = str(tmp_path / "cat.zarr")
    shutil.copytree(small_clean[0], url)
    cruise = tmp_path / "cruise"
    synth(cruise, images=40, seed=22)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs (the kernel does not reuse it this soon)
    _lock_of(url, host=socket.gethostname(), pid=gone.pid, started=1.0)
    monkeypatch.setattr(logging.getLogger("pzscale"), "propagate", True)  # the CLI's own handler may be set
    with caplog.at_level("WARNING", logger="pzscale"):
        report = ingest([str(cruise)], url, append=True, client=client, progress=False)
    assert report.rows == (len(small_clean[3]), len(small_clean[3]) + 40)
    assert f"taking over the ingest lock of {socket.gethostname()} pid {gone.pid}" in caplog.text
    assert read_lock(url) is None
    # a live process of this host whose pid was reused by a later process: its recorded start differs
    _lock_of(url, host=socket.gethostname(), pid=os.getpid(), started=1.0)
    with metadata_lock(url):
        assert read_lock(url)["pid"] == os.getpid() and read_lock(url)["token"] != "theirs"


def test_a_lock_from_another_host_needs_pzscale_unlock(small_clean, tmp_path):
    from typer.testing import CliRunner

    from pzscale.cli import app

    url = str(tmp_path / "cat.zarr")
    shutil.copytree(small_clean[0], url)
    _lock_of(url, host="node-7.cluster", pid=4242, started=1.0)
    with pytest.raises(CatalogError, match=r"node-7\.cluster pid 4242 .*pzscale unlock --catalog"), metadata_lock(url):
        pass
    refused = CliRunner().invoke(app, ["unlock", "-c", url], input="n\n")
    assert refused.exit_code == 1 and "locked by node-7.cluster pid 4242" in refused.output
    assert read_lock(url)["host"] == "node-7.cluster"
    removed = CliRunner().invoke(app, ["unlock", "-c", url], input="y\n")
    assert removed.exit_code == 0 and read_lock(url) is None
    assert CliRunner().invoke(app, ["unlock", "-c", url]).output.endswith("not locked\n")


def test_two_appends_at_once_are_serialised_or_refused_never_interleaved(small_clean, sample_data, client,
                                                                          tmp_path, tally):
    """Two collections appended at the same moment: one waits its turn (refused, then rerun) or comes
    after the other; each ends whole and in its own rows, as when ingested alone."""
    base_url, _, _, base_ids = small_clean
    url = str(tmp_path / "cat.zarr")
    shutil.copytree(base_url, url)
    cruises, alone = {}, {}
    for name, copies in (("cruise_a", 4), ("cruise_b", 5)):  # 36 and 45 rows: they share a shard
        cruises[name] = _class_tree(sample_data, tmp_path / name, copies)
        alone[name] = str(tmp_path / f"{name}.zarr")
        ingest([str(cruises[name])], alone[name], shard_len=SHARD_LEN, client=client, progress=False)
    start = threading.Barrier(2)
    outcome: dict[str, object] = {}

    def append(name):
        start.wait()
        try:
            outcome[name] = ingest([str(cruises[name])], url, append=True, client=client, progress=False)
        except CatalogError as e:
            outcome[name] = e

    threads = [threading.Thread(target=append, args=(n,)) for n in cruises]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    refused = [n for n, o in outcome.items() if isinstance(o, CatalogError)]
    assert len(outcome) == 2 and len(refused) <= 1, outcome
    for name in refused:  # the refused one, rerun once the other is done
        assert "another ingest" in str(outcome[name]) or "unfinished" in str(outcome[name]), outcome[name]
        outcome[name] = ingest([str(cruises[name])], url, append=True, client=client, progress=False)
    order = sorted(cruises, key=lambda n: outcome[n].rows[0])
    expected = np.concatenate([base_ids, *(image_ids(alone[n]) for n in order)])
    np.testing.assert_array_equal(image_ids(url), expected)  # each collection whole, one after the other
    _check_same_rows(tally, url, expected)
    group = catalog.open_group(url)
    row = len(base_ids)
    for name in order:
        theirs = catalog.open_group(alone[name])
        n = theirs["image_id"].shape[0]
        assert outcome[name].rows == (row, row + n)
        for array in ("status", "original_label", "image_bytes"):
            np.testing.assert_array_equal(group[array][row:row + n], theirs[array][:])
        row += n


def test_transient_error_on_the_first_request_of_every_task_is_retried(small_synth, small_clean, client, tmp_path,
                                                                       fast_backoff, tally):
    """Every shard task starts by opening the catalog (a HEAD of zarr.json): throttled there 16 times,
    more than Dask's immediate retries absorb (5 shards x 3 runs), the tasks still finish with the
    backoff inside the task."""
    _, clean_report, clean_sums, _ = small_clean
    log = tmp_path / "faults"
    local = tmp_path / "cat.zarr"
    so = {"fail_rate": 1.0, "fail_times": 16, "fail_on": [f"info:{local}/zarr.json"], "log_dir": str(log),
          "only_in_workers": True}
    report = ingest([str(small_synth)], faulty(local), shard_len=SHARD_LEN, client=client, progress=False,
                    storage_options=so)
    assert tally.add_faults(log).total() == 16
    assert report.shards_written == clean_report.shards_total and not report.failures
    assert catalog.checksums(str(local)) == clean_sums


# ---------------------------------------------------------------- the retry policy itself


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


def _reworded(origin: Exception) -> CatalogError:
    try:
        raise origin
    except Exception:
        try:
            raise CatalogError("s3://b/cat.zarr: cannot reach the store") from None
        except CatalogError as e:
            return e


@pytest.mark.parametrize("error,transient", [
    (TimeoutError("read timed out"), True), (ConnectionResetError(104, "reset"), True),
    (OSError(errno.EBUSY, "SlowDown"), True), (OSError(errno.EREMOTEIO, "InternalError"), True),
    (_client_error("SlowDown", 503), True), (_client_error("InternalError", 500), True),
    (_client_error("NoSuchKey", 404), False), (_client_error("AccessDenied", 403), False),
    (FileNotFoundError("gone"), False), (PermissionError("denied"), False), (OSError(errno.EINVAL, "412"), False),
    (OSError("image file is truncated"), False), (ValueError("bad"), False),
    (InputError("bad file"), False), (StageError("gave up"), False), (CatalogError("no catalog"), False),
    (_reworded(TimeoutError("slow")), True), (_reworded(PermissionError("denied")), False),
], ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v))
def test_which_errors_are_transient(error, transient):
    assert is_transient(error) is transient


def test_backoff_retries_transient_errors_only():
    calls = []

    def flaky(arg):
        calls.append(arg)
        if len(calls) < 3:
            raise OSError(errno.EBUSY, "SlowDown")
        return arg * 2

    policy = progress.Backoff(attempts=4, base_s=0.001, max_s=0.002)
    assert progress.call_with_backoff(flaky, 21, backoff=policy) == 42 and calls == [21, 21, 21]
    calls.clear()
    with pytest.raises(InputError):
        progress.call_with_backoff(lambda arg: calls.append(arg) or (_ for _ in ()).throw(InputError("bad")), 1,
                                   backoff=policy)
    assert calls == [1]  # never repeated
    with pytest.raises(StageError, match=r"gave up after 4 attempts in [\d.]+ s; last error TimeoutError: slow") \
            as failed:
        progress.call_with_backoff(lambda arg: (_ for _ in ()).throw(TimeoutError("slow")), 1, backoff=policy)
    assert isinstance(failed.value.__cause__, TimeoutError)
    pauses = [policy.pause(k, random.Random(k)) for k in range(10)]
    assert all(0 <= p <= policy.max_s for p in pauses)
