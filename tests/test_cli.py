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
    result = runner.invoke(app, ["demo", str(out), "--images", "400", "--epochs", "1", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "500 images" in result.output and "results: catalog" in result.output  # 400 parquet + 100 IFCB
    assert "(ifcb): rows 400..500" in result.output and "demo_cruise_ifcb 100" in result.output
    assert "macro_f1" in result.output and "species" in result.output and (out / "model" / "model_card.json").exists()
    assert (out / "sample_grid.png").stat().st_size > 1000
    again = runner.invoke(app, ["demo", str(out), "--images", "200", "--epochs", "1", "--workers", "1"])
    assert again.exit_code == 0 and "300 images" in again.output
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    result = runner.invoke(app, ["demo", str(foreign)])
    assert result.exit_code == 1 and (foreign / "thesis.tex").exists()


@pytest.mark.cluster
def test_synth_ifcb_ingest_and_taxonomy_report(tmp_path, sample_data):
    bins, url = tmp_path / "bins", str(tmp_path / "cat.zarr")
    result = runner.invoke(app, ["synth", str(bins), "--images", "150", "--format", "ifcb"])
    assert result.exit_code == 0, result.output
    truth = json.loads((bins / "truth.json").read_text())
    result = runner.invoke(app, ["ingest", str(bins), "--catalog", url, "--source", "cruise_ifcb",
                                 "--shard-len", "64", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "status: ok=150" in result.output
    table = str(sample_data / "planktonzilla" / "planktonzilla_taxonomy.csv")
    result = runner.invoke(app, ["taxonomy", "report", "--catalog", url, "--table", table, "--out",
                                 str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "unmapped (source, raw label): 0 pair(s)" in result.output  # raw bins carry no labels
    assert "harpacticoida" in result.output
    conflicts = (tmp_path / "report" / "conflicts.csv").read_text()
    assert "zooscan" in conflicts and len(truth["bins"]) == 1


def test_readers_lists_builtin_formats():
    result = runner.invoke(app, ["readers"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()] == [
        "parquet", "ifcb", "ecotaxa", "webdataset", "folder"]


def test_version_and_environment_defaults(tmp_path):
    from importlib.metadata import version

    assert runner.invoke(app, ["--version"]).output == f"pzscale {version('pzscale')}\n"
    url = str(tmp_path / "cat.zarr")
    from pzscale import catalog

    catalog.create(url, n_rows=10, shard_len=256)
    result = runner.invoke(app, ["info", "--json"], env={"PZSCALE_CATALOG": url})
    assert result.exit_code == 0 and json.loads(result.output)["rows"] == 10
    result = runner.invoke(app, ["info", url], env={"PZSCALE_STORAGE_OPTIONS": "[1]"})
    assert result.exit_code == 2 and "must be a JSON object" in result.output


def test_a_missing_optional_package_is_one_line_naming_the_extra(tmp_path):
    import subprocess
    import sys

    from pzscale import catalog

    url = str(tmp_path / "cat.zarr")
    catalog.create(url, n_rows=10, shard_len=256)
    hide_sklearn = "import sys; sys.modules['sklearn'] = None; from pzscale.cli import app; app(prog_name='pzscale')"
    result = subprocess.run([sys.executable, "-c", hide_sklearn, "split", "-c", url], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr == ("error: this command needs the Python package 'sklearn', which is not installed: "
                             "pip install 'pzscale[ml]'\n")


def test_subcommand_groups_end_errors_in_one_line_too(tmp_path):
    for args in (["taxonomy", "report", "-c", str(tmp_path / "none.zarr")],
                 ["export", "dwc", "-c", str(tmp_path / "none.zarr"), "--out", str(tmp_path / "o.csv")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and result.output.startswith("error: ") and "no catalog here" in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
