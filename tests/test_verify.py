"""`pzscale verify`: damaged shards found against their done markers, one line each, exit 1; their markers
removed so that rerunning the owning stage (ingest with its sources, or any other stage) rewrites them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pzscale import catalog, info, read_images
from pzscale.cli import app
from pzscale.errors import StageError
from pzscale.ingest import ingest
from pzscale.stage import Catalog
from pzscale.verify import verify
from tests.conftest import architecture_example

pytestmark = pytest.mark.cluster


def _shard_object(url: str, array: str, shard: int) -> Path:
    path = Path(url) / array / "c" / str(shard)
    assert path.is_file(), path
    return path


def test_a_clean_catalog_verifies(cat_url, client):
    report = verify(cat_url, client=client)
    assert report.ok and report.shards == Catalog.open(cat_url).n_rows // 64 + 1 and report.markers_removed == 0
    assert "0 shard(s) damaged" in str(report)


def test_a_truncated_shard_is_one_line_everywhere_and_an_ingest_rerun_rewrites_it(cat_url, synth_dir, client):
    before = read_images(cat_url, [70, 71])
    for array in ("status", "image_bytes"):
        obj = _shard_object(cat_url, array, 1)
        obj.write_bytes(obj.read_bytes()[: obj.stat().st_size // 2])  # an upload cut in the middle
    with pytest.raises(StageError, match=r"reading shard 1 failed.*pzscale verify") as e:
        info.summarize(cat_url)
    assert "\n" not in str(e.value)

    report = verify(cat_url, client=client)
    assert not report.ok and [(d.shard, d.array) for d in report.damaged] == [(1, "image_bytes"), (1, "status")]
    line = str(report.damaged[0])
    assert "\n" not in line and line.startswith("DAMAGED shard 1 (rows 64-127) image_bytes: does not decode")
    assert re.search(r"rerun ingest/\w+", line) and report.markers_removed == 1

    rerun = ingest([str(synth_dir)], cat_url, client=client, progress=False)
    assert rerun.shards_written == 1  # only the damaged shard
    assert verify(cat_url, client=client).ok
    after = read_images(cat_url, [70, 71])
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_a_deleted_shard_object_is_found_and_read_only_keeps_the_markers(cat_url, synth_dir, client):
    _shard_object(cat_url, "image_id", 2).unlink()  # zarr now reads fill values: ids "" under a done marker
    _shard_object(cat_url, "image_bytes", 3).unlink()
    report = verify(cat_url, client=client, read_only=True)
    found = {(d.shard, d.array) for d in report.damaged}
    assert found == {(2, "image_id"), (3, "image_bytes")}
    assert report.markers_removed == 0
    assert "64 row(s) the ingest marked done are empty" in str(report)
    assert ingest([str(synth_dir)], cat_url, client=client, progress=False).shards_written == 0  # still marked

    assert verify(cat_url, client=client).markers_removed == 2
    assert ingest([str(synth_dir)], cat_url, client=client, progress=False).shards_written == 2
    assert verify(cat_url, client=client).ok


def test_a_damaged_stage_array_is_rewritten_by_rerunning_that_stage(cat_url, client):
    scope = architecture_example()  # the example stage of ARCHITECTURE.md
    scope["image_area"](cat_url, client=client, progress=False)
    obj = _shard_object(cat_url, "image_area", 0)
    obj.write_bytes(b"\0" * obj.stat().st_size)
    report = verify(cat_url, client=client)
    assert [(d.shard, d.array, d.stages) for d in report.damaged] == [(0, "image_area", ("image_area",))]
    assert scope["image_area"](cat_url, client=client, progress=False).shards_written == 1
    assert verify(cat_url, client=client).ok
    assert catalog.done_shards(cat_url, "image_area") == set(range(len(Catalog.open(cat_url).shards())))


def test_the_command_exits_1_with_one_line_per_damaged_shard(cat_url):
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", "--catalog", cat_url, "--workers", "1"])
    assert ok.exit_code == 0, ok.output
    _shard_object(cat_url, "status", 0).write_bytes(b"garbage")
    bad = runner.invoke(app, ["verify", "--catalog", cat_url, "--workers", "1", "--read-only"])
    assert bad.exit_code == 1
    damaged = [line for line in bad.output.splitlines() if line.startswith("DAMAGED")]
    assert len(damaged) == 1 and damaged[0].startswith("DAMAGED shard 0 (rows 0-63) status: does not decode")
