"""The stage runner: the catalog handle, pending shards from markers, markers written last, one report,
failures named per shard, reads in shard order, and the "how to add a stage" example of ARCHITECTURE.md."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pzscale import catalog, progress
from pzscale.errors import StageError
from pzscale.stage import Catalog, ShardResult, ShardTask, map_shards, pending, run_stage
from tests.conftest import architecture_example

pytestmark = [pytest.mark.cluster]



def test_the_handle_is_small_picklable_and_knows_the_shape(cat_url):
    cat = Catalog.open(cat_url)
    group = catalog.open_group(cat_url)
    assert (cat.n_rows, cat.shard_len) == (catalog.n_rows_of(group), catalog.metadata(group)["shard_len"])
    assert cat.shards() == catalog.shard_ranges(0, cat.n_rows, cat.shard_len)
    again = pickle.loads(pickle.dumps(cat))
    assert again == cat and len(pickle.dumps(cat)) < 500
    assert again.group() is cat.group()  # one open group per process and handle


def _double_width(task: ShardTask) -> ShardResult:
    width = task.catalog.read(task.start, task.stop, ["width"])["width"]
    task.catalog.write(task.start, task.stop, {"twice": (2 * width).astype(np.int64)})
    return ShardResult(task.stop - task.start, {"twice": {"note": task.params["note"]}}, status={"ok": 1})


def test_run_stage_writes_shards_then_markers_and_resumes(cat_url, client):
    cat = Catalog.open(cat_url)
    cat.ensure_array("twice", dtype="int64", fill=0)
    tasks, skipped = pending(cat, "twice", params={"note": "x"})
    assert skipped == 0 and [t.shard for t in tasks] == list(range(len(cat.shards())))
    done = run_stage("twice", _double_width, tasks[:2], catalog=cat, client=client, progress_bar=False)
    assert (done.shards_written, done.shards_total, done.status) == (2, 2, {"ok": 2})
    infos = cat.markers("twice")
    assert set(infos) == {0, 1} and infos[0]["rows"] == [0, cat.shard_len] and infos[0]["note"] == "x"
    # a rerun computes only the shards without a marker
    tasks, skipped = pending(cat, "twice", params={"note": "x"})
    assert skipped == 2 and tasks[0].shard == 2
    report = run_stage("twice", _double_width, tasks, catalog=cat, client=client, skipped=skipped,
                       progress_bar=False)
    assert report.shards_written == len(cat.shards()) - 2 and report.rows_computed == cat.n_rows - 2 * cat.shard_len
    group = cat.group()
    np.testing.assert_array_equal(group["twice"][:], 2 * group["width"][:].astype(np.int64))
    # a marker that does not pass `valid` counts as absent
    tasks, skipped = pending(cat, "twice", valid=lambda info: info.get("note") == "y")
    assert skipped == 0 and len(tasks) == len(cat.shards())


def _fail_on_shard_one(task: ShardTask) -> ShardResult:
    if task.shard == 1:
        raise ValueError("broken input in shard one")
    return _double_width(task)


def test_a_failed_shard_is_named_and_gets_no_marker(cat_url, client):
    cat = Catalog.open(cat_url)
    cat.ensure_array("twice", dtype="int64", fill=0)
    tasks, _ = pending(cat, "twice", params={"note": "x"})
    with pytest.raises(StageError, match=r"1 shard\(s\) failed; rerun to resume(.|\n)*shard 1: ValueError"):
        run_stage("twice", _fail_on_shard_one, tasks, catalog=cat, client=client, progress_bar=False)
    assert 1 not in cat.markers("twice") and 0 in cat.markers("twice")


def test_without_a_client_shards_run_in_this_process(cat_url, monkeypatch):
    monkeypatch.setattr("pzscale.stage.get_client", lambda: (_ for _ in ()).throw(ValueError("no client")))
    cat = Catalog.open(cat_url)
    cat.ensure_array("twice", dtype="int64", fill=0)
    tasks, _ = pending(cat, "twice", params={"note": "x"})
    report = run_stage("twice", _double_width, tasks, catalog=cat, client=None, progress_bar=False)
    assert report.shards_written == len(cat.shards())
    assert map_shards(lambda c, a, b: (a, b), cat) == [(a, b) for _, a, b in cat.shards()]


def _rows_and_sum(cat: Catalog, start: int, stop: int, big: np.ndarray) -> tuple[int, int, float]:
    return start, stop, float(big.sum())


def test_map_shards_keeps_shard_order_and_ships_large_arguments_once(cat_url, client):
    cat = Catalog.open(cat_url)
    big = np.ones(1_000_000, np.float32)  # 4 MB: scattered to the workers, not put in every task
    parts = map_shards(_rows_and_sum, cat, big, client=client)
    assert [(a, b) for a, b, _ in parts] == [(a, b) for _, a, b in cat.shards()]
    assert all(total == 1_000_000 for _, _, total in parts)


def test_transient_errors_are_retried_inside_the_task(cat_url, client, fast_backoff, tmp_path):
    marker = tmp_path / "failed-once"

    def flaky(task: ShardTask) -> ShardResult:
        if task.shard == 0 and not marker.exists():
            marker.touch()
            raise TimeoutError("injected: read timed out")
        return ShardResult(0)

    cat = Catalog.open(cat_url)
    tasks, _ = pending(cat, "flaky")
    report = run_stage("flaky", flaky, tasks, catalog=cat, client=client, progress_bar=False)
    assert marker.exists() and report.shards_written == len(tasks) and not report.failures


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(progress, "DEFAULT_BACKOFF", progress.Backoff(attempts=4, base_s=0.001, max_s=0.005))


def test_the_architecture_example_is_a_working_stage(cat_url, client):
    """ARCHITECTURE.md's "how to add a stage" block, run as written: it must stay true."""
    namespace = architecture_example()
    report = namespace["image_area"](cat_url, client=client, progress=False)
    cat = Catalog.open(cat_url)
    assert report.shards_written == len(cat.shards())
    group = cat.group()
    np.testing.assert_array_equal(group["image_area"][:], group["width"][:].astype(np.int64) * group["height"][:])
    again = namespace["image_area"](cat_url, client=client, progress=False)
    assert again.shards_written == 0 and again.shards_skipped == len(cat.shards())
