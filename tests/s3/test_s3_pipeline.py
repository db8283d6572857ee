"""The pipeline on a catalog at s3:// (moto server on 127.0.0.1) equals the same run on local disk.

Ingest runs through the CLI (``--storage-options`` JSON, the session cluster's address), then
split, embed and classify (a seeded built-in CNN), dedup (exact, near, semantic) and env (a
grid on S3) through the API with ``storage_options``; every array's checksum, the dedup
reports and the opened xarray Datasets must equal a local run's, and no credential may appear
in the catalog's objects or in any output.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pandas as pd
import pytest
import s3fs
import torch
import xarray as xr
from typer.testing import CliRunner

from pzscale import catalog, grids, open_catalog
from pzscale.classify import classify
from pzscale.cli import app
from pzscale.dedup import dedup, read_report
from pzscale.embed import embed
from pzscale.env import env
from pzscale.ingest import ingest
from pzscale.ml.models import ModelCard, builtin_backbone, make_head, save_model
from pzscale.split import assign_splits
from tests.conftest import SHARD_LEN
from tests.s3.conftest import N_IMAGES

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
DEDUP_METHODS = ("exact", "near", "semantic")


def make_model(model_dir: str, url: str) -> ModelCard:
    """A seeded, untrained built-in CNN over the catalog's lineages: a real model, cheaper than training one."""
    lineages = sorted(set(open_catalog(url)["lineage"].values) - {""})
    torch.manual_seed(0)
    card = ModelCard(name="s3-pipeline", version="1", kind="builtin", architecture="pzcnn-small", embed_dim=32,
                     image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), classes=lineages, head="linear")
    return save_model(model_dir, card, builtin_backbone(32), make_head("linear", 32, len(lineages)))


@pytest.fixture(scope="module")
def pipeline(moto_s3, s3_synth, s3_reference, client, tmp_path_factory):
    """The same stages on a local copy of the reference catalog and on an S3 catalog ingested by the CLI."""
    work = tmp_path_factory.mktemp("s3pipe")
    so = moto_s3.options()
    s3_url, local_url = moto_s3.url("pipeline/catalog.zarr"), str(work / "catalog.zarr")
    shutil.copytree(s3_reference[0], local_url)
    ingest_cli = CliRunner().invoke(app, [
        "ingest", str(s3_synth), "--catalog", s3_url, "--shard-len", str(SHARD_LEN),
        "--scheduler", client.scheduler.address, "--storage-options", json.dumps(so)])
    assert ingest_cli.exit_code == 0, ingest_cli.output
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        rerun = ingest([str(s3_synth)], s3_url, client=client, storage_options=so)
        model_dir = str(work / "model")
        for url, options in ((local_url, None), (s3_url, so)):
            assign_splits(url, seed=3, storage_options=options)
        make_model(model_dir, local_url)
        # one grid on S3 for both runs (so the recorded stage parameters agree): a NetCDF fetched by the workers
        grid = moto_s3.url("grids/grid.nc")
        s3fs.S3FileSystem(skip_instance_cache=True, **so).put_file(
            grids.synthetic_grid(str(work / "grid.nc"), resolution=4.0, months=48), grid.removeprefix("s3://"))
        reports, dedups = {}, {}
        for url, options in ((local_url, None), (s3_url, so)):
            reports[url] = (embed(url, model_dir, client=client, storage_options=options),
                            classify(url, model_dir, client=client, storage_options=options))
            dedups[url] = dedup(url, methods=DEDUP_METHODS, client=client, storage_options=options)
            env(url, grid, ["sst"], client=client, storage_options=options, grid_storage_options=so)
    return {"s3": s3_url, "local": local_url, "so": so, "model": model_dir, "rerun": rerun, "reports": reports,
            "dedups": dedups,
            "output": ingest_cli.output + output.getvalue(), "reference_sums": s3_reference[1],
            "s3_sums": catalog.checksums(s3_url, storage_options=so),
            "local_sums": catalog.checksums(local_url)}


def test_ingest_through_the_cli_on_s3_equals_local_and_prints_the_dashboard(pipeline):
    s3_sums = pipeline["s3_sums"]
    assert {name: s3_sums[name] for name in pipeline["reference_sums"]} == pipeline["reference_sums"]
    assert "dashboard http://" in pipeline["output"]
    rerun = pipeline["rerun"]
    assert rerun.shards_written == 0 and rerun.shards_skipped == rerun.shards_total == -(-N_IMAGES // SHARD_LEN)


def test_split_embed_classify_on_s3_equal_local_array_by_array(pipeline):
    s3_sums, local_sums = pipeline["s3_sums"], pipeline["local_sums"]
    card = ModelCard.load(pipeline["model"])
    assert f"emb__{card.id}" in s3_sums and f"pred__{card.id}__label" in s3_sums and "split" in s3_sums
    assert s3_sums == local_sums
    ds_s3 = open_catalog(pipeline["s3"], storage_options=pipeline["so"]).compute()
    ds_local = open_catalog(pipeline["local"]).compute()
    xr.testing.assert_equal(ds_s3, ds_local)
    meta_s3, meta_local = (catalog.metadata(catalog.open_group(u, storage_options=o))
                           for u, o in ((pipeline["s3"], pipeline["so"]), (pipeline["local"], None)))
    assert meta_s3["stages"] == meta_local["stages"]
    for embed_report, classify_report in pipeline["reports"].values():
        assert embed_report.shards_written == classify_report.shards_written == embed_report.shards_total


def test_dedup_and_env_on_s3_equal_local(pipeline):
    s3_sums, local_sums = pipeline["s3_sums"], pipeline["local_sums"]
    written = {name for name in s3_sums if name.startswith(("dup_", "env_", "pixel_hash", "phash"))}
    assert {"dup_keep", "dup_exact", "dup_near", "dup_semantic", "env_sst", "env_sst_qc"} <= written
    assert {name: s3_sums[name] for name in written} == {name: local_sums[name] for name in written}
    s3_report, local_report = (pipeline["dedups"][pipeline[k]] for k in ("s3", "local"))
    assert s3_report.per_method == local_report.per_method and s3_report.kept == local_report.kept
    assert local_report.per_method["exact"]["groups"] > 0  # the synthetic collection plants duplicates
    for method in DEDUP_METHODS:
        pd.testing.assert_frame_equal(
            read_report(pipeline["s3"], f"{method}_pairs", storage_options=pipeline["so"]),
            read_report(pipeline["local"], f"{method}_pairs"))
    qc = open_catalog(pipeline["s3"], storage_options=pipeline["so"])["env_sst_qc"].values
    assert (qc == grids.QC_OK).any()


def test_markers_on_s3_cover_every_shard_and_a_rerun_skips_them(pipeline, client):
    so, url = pipeline["so"], pipeline["s3"]
    card = ModelCard.load(pipeline["model"])
    shards = set(range(-(-N_IMAGES // SHARD_LEN)))
    done = catalog.stages_done(url, storage_options=so)
    assert done[f"embed/{card.id}"] == done[f"classify/{card.id}"] == shards
    again = embed(url, pipeline["model"], client=client, storage_options=so, progress=False)
    assert again.shards_skipped == len(shards) and again.shards_written == 0


def test_no_credential_in_the_catalog_or_in_any_output(pipeline, moto_s3, client):
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **pipeline["so"])
    objects = fs.find(pipeline["s3"])
    assert any(o.endswith(".json") and "/_pzscale/done/" in o for o in objects)
    contents = fs.cat(objects)
    # the workers ran every stage with the credentials in their tasks: their logs and the scheduler's stay clean
    logs = str(client.get_worker_logs()) + str(client.get_scheduler_logs())
    for secret in (moto_s3.secret, moto_s3.key):
        leaked = [path for path, body in contents.items() if secret.encode() in body]
        assert not leaked, f"credential found in {leaked[:3]}"
        assert secret not in pipeline["output"] and secret not in logs
    # a failing command with credentials in --storage-options: a clear one-line error, no credential
    failed = CliRunner().invoke(app, [
        "embed", "--catalog", moto_s3.url("missing/catalog.zarr"), "--model", pipeline["model"],
        "--scheduler", client.scheduler.address, "--storage-options", json.dumps(pipeline["so"])])
    assert failed.exit_code == 1
    assert "missing/catalog.zarr: no catalog here" in failed.output
    assert moto_s3.secret not in failed.output and moto_s3.key not in failed.output
