import json

import pytest
from typer.testing import CliRunner

from pzscale.cli import app

runner = CliRunner()


@pytest.mark.cluster
def test_synth_ingest_info(tmp_path):
    src, url = tmp_path / "src", str(tmp_path / "cat.zarr")
    result = runner.invoke(app, ["synth", str(src), "--images", "300", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "truth.json" in result.output
    result = runner.invoke(app, ["ingest", str(src), "--catalog", url, "--shard-len", "128", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "3 shard(s) written" in result.output
    result = runner.invoke(app, ["info", url, "--json"])
    summary = json.loads(result.output)
    assert summary["rows"] == 300 and summary["shards"] == 3
    assert summary["plans"][0]["shards_done"] == 3
    assert sum(summary["status"].values()) == 300 and summary["status"]["decode_error"] >= 2
    text = runner.invoke(app, ["info", url]).output
    assert "300 images in 3 shard(s)" in text and "3/3 shards done (complete)" in text


def test_errors_are_one_line_and_exit_1(tmp_path):
    result = runner.invoke(app, ["ingest", str(tmp_path), "--catalog", "nosuch://b/x.zarr"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: nosuch://b/x.zarr: unknown URL scheme")
    assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["info", str(tmp_path / "none.zarr")])
    assert result.exit_code == 1 and "no catalog here" in result.output
    result = runner.invoke(app, ["info", str(tmp_path), "--storage-options", "{bad"])
    assert result.exit_code == 2 and "not JSON" in result.output


@pytest.mark.cluster
def test_demo_summarises_and_refuses_foreign_folders(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", str(out), "--images", "400", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "400 images" in result.output and "results: catalog" in result.output
    assert (out / "sample_grid.png").stat().st_size > 1000
    again = runner.invoke(app, ["demo", str(out), "--images", "200", "--workers", "1"])
    assert again.exit_code == 0 and "200 images" in again.output
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    result = runner.invoke(app, ["demo", str(foreign)])
    assert result.exit_code == 1 and (foreign / "thesis.tex").exists()
