"""synth -> ingest -> open_catalog on a real LocalCluster of worker processes."""

import io
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pzscale import catalog, open_catalog, read_images
from pzscale.errors import CatalogError, InputError, StageError
from pzscale.ingest import _plan_record, ingest, make_plan
from pzscale.schema import VARIABLE_NAMES
from pzscale.synth import synth
from tests.conftest import N_IMAGES, SHARD_LEN

pytestmark = pytest.mark.cluster


def _source_rows(folder):
    return pq.read_table(sorted(folder.glob("*.parquet"))).to_pylist()


def test_every_row_every_variable_and_bit_exact_pixels(synth_dir, clean_catalog):
    url, report, _ = clean_catalog
    truth = json.loads((synth_dir / "truth.json").read_text())
    ds = open_catalog(url)
    assert ds.sizes["image"] == N_IMAGES
    assert set(VARIABLE_NAMES) <= set(ds.variables)
    assert report.shards_total == report.shards_written == -(-N_IMAGES // SHARD_LEN)
    local = ds.drop_vars("image_bytes").compute()
    assert local["image_id"].to_series().is_unique

    src = _source_rows(synth_dir)  # the plan keeps parquet order: catalog row i = source row i
    corrupt = {c["image_id"] for c in truth["corrupt"]}
    ok_rows = np.flatnonzero(local["status"].values == "ok")
    decoded = dict(zip(ok_rows, read_images(url, ok_rows), strict=True))
    for i, row in enumerate(src):
        image_id = f"{row['dataset']}:{row['ObjID']}"
        assert local["image_id"].values[i] == image_id
        if image_id in corrupt:
            assert local["status"].values[i] == "decode_error"
            assert local["error"].values[i]
            continue
        with Image.open(io.BytesIO(row["image"]["bytes"])) as img:
            expected = np.asarray(img)
        np.testing.assert_array_equal(decoded[i], expected)
        assert (local["height"].values[i], local["width"].values[i]) == expected.shape[:2]
    assert int((local["status"] == "decode_error").sum()) == len(corrupt)


def test_metadata_mapped_to_standard_variables(synth_dir, clean_catalog):
    url, _, _ = clean_catalog
    ds = open_catalog(url).drop_vars("image_bytes").compute()
    src = pd.DataFrame([{k: v for k, v in r.items() if k != "image"} for r in _source_rows(synth_dir)])
    np.testing.assert_allclose(ds["lat"].values, src["Latitude"].astype(float).values, equal_nan=True)
    np.testing.assert_allclose(ds["depth_max"].values, src["Depth_max"].astype(float).values,
                               equal_nan=True, rtol=1e-6)
    expected_time = pd.to_datetime(src["timestamp"], utc=True).dt.tz_convert(None).values
    np.testing.assert_array_equal(ds["time"].values.astype("datetime64[ms]"),
                                  expected_time.astype("datetime64[ms]"))
    assert np.isnat(ds["time"].values).any() and np.isnan(ds["lat"].values).any()
    chaeto = ds["original_label"].values == "Chaetoceros"
    assert set(ds["lineage"].values[chaeto]) == {
        "chromista heterokontophyta bacillariophyceae chaetocerotanae chaetocerotaceae chaetoceros"}
    assert set(ds["aphia_id"].values[chaeto]) == {148985}
    assert set(ds["ncbi_id"].values[chaeto]) == {"49237"}  # KI-12: "49237.0" normalised
    assert set(ds["instrument"].values) == {"IFCB", "UVP5", "ZooScan", "PlanktoScope"}
    assert not ds["plankton"].values[ds["root_class"].values == "detritus"].any()
    meta = json.loads(ds.attrs["pzscale"])
    assert meta["shard_len"] == SHARD_LEN and meta["version"]
    assert meta["plans"][0]["row_stop"] == N_IMAGES and meta["plans"][0]["items"] == 3


def test_rerun_skips_finished_shards(synth_dir, clean_catalog, client):
    url, _, sums = clean_catalog
    report = ingest([str(synth_dir)], url, client=client, progress=False)
    assert report.shards_written == 0 and report.shards_skipped == report.shards_total
    assert catalog.checksums(url) == sums


def test_shard_len_conflict_and_other_sources_need_append(synth_dir, clean_catalog, client, tmp_path):
    url, _, _ = clean_catalog
    with pytest.raises(CatalogError, match="shard length 64, not 128"):
        ingest([str(synth_dir)], url, shard_len=128, client=client, progress=False)
    other = tmp_path / "other"
    synth(other, images=50, seed=11)
    with pytest.raises(CatalogError, match="pass --append"):
        ingest([str(other)], url, client=client, progress=False)


def test_append_leaves_existing_rows_untouched(synth_dir, clean_catalog, client, tmp_path):
    _, _, sums = clean_catalog
    url = str(tmp_path / "cat.zarr")
    shutil.copytree(clean_catalog[0], url)
    before = open_catalog(url).drop_vars("image_bytes").compute()
    old_bytes = open_catalog(url)["image_bytes"].values
    cruise = tmp_path / "cruise"
    synth(cruise, images=150, seed=99)
    report = ingest([str(cruise)], url, append=True, client=client, progress=False)
    assert report.rows == (N_IMAGES, N_IMAGES + 150)
    after = open_catalog(url)
    assert after.sizes["image"] == N_IMAGES + 150
    head = after.isel(image=slice(0, N_IMAGES))
    for name in before.variables:
        np.testing.assert_array_equal(head[name].values, before[name].values, err_msg=name)
    assert list(head["image_bytes"].values) == list(old_bytes)
    tail = after.isel(image=slice(N_IMAGES, None)).drop_vars("image_bytes").compute()
    assert (tail["status"] != "").all()
    src = _source_rows(cruise)
    assert list(tail["image_id"].values) == [f"{r['dataset']}:{r['ObjID']}" for r in src]
    assert len(json.loads(after.attrs["pzscale"])["plans"]) == 2
    # the appended collection resumes like any other: a rerun writes nothing
    again = ingest([str(cruise)], url, append=True, client=client, progress=False)
    assert again.shards_written == 0


def test_plan_is_deterministic_and_reads_metadata_only(synth_dir):
    a = make_plan([str(synth_dir)], shard_len=SHARD_LEN)
    b = make_plan([str(synth_dir / "*.parquet")], shard_len=SHARD_LEN)
    assert a.id == b.id and a.items == b.items and a.rows == N_IMAGES
    tasks = a.shard_tasks()
    assert [t["shard"] for t in tasks] == list(range(len(tasks)))
    assert sum(stop - first for t in tasks for _, first, stop in t["segments"]) == N_IMAGES
    # shard 7 spans the boundary between the first two files (500 rows each)
    assert [a.items[i].source.rsplit("/", 1)[-1] for i, _, _ in tasks[7]["segments"]] == [
        "train-00000-of-00003.parquet", "train-00001-of-00003.parquet"]
    assert set(a.readers) == {"parquet"}


# ---------------------------------------------------------------- bad input


def _copy_sources(synth_dir, dest):
    dest.mkdir()
    for p in synth_dir.glob("*.parquet"):
        shutil.copy(p, dest / p.name)
    return dest


def test_missing_or_renamed_column_is_named(synth_dir, tmp_path, client):
    src = _copy_sources(synth_dir, tmp_path / "src")
    target = src / "train-00001-of-00003.parquet"
    table = pq.read_table(target)
    pq.write_table(table.rename_columns(["latitude" if c == "Latitude" else c for c in table.column_names])
                   .drop(["ObjID"]), target)
    url = str(tmp_path / "cat.zarr")
    with pytest.raises(InputError) as err:
        ingest([str(src)], url, client=client, progress=False)
    msg = str(err.value)
    assert "train-00001-of-00003.parquet" in msg and "Latitude (found 'latitude')" in msg and "ObjID" in msg
    assert "\n" not in msg
    assert not catalog.exists(url)  # nothing was created


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_empty_or_truncated_file_fails_before_any_write(synth_dir, tmp_path, client, damage):
    src = _copy_sources(synth_dir, tmp_path / "src")
    target = src / "train-00002-of-00003.parquet"
    data = target.read_bytes()
    target.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    url = str(tmp_path / "cat.zarr")
    with pytest.raises(InputError, match="train-00002-of-00003.parquet: (file is empty|not a readable parquet)"):
        ingest([str(src)], url, client=client, progress=False)
    assert not catalog.exists(url)


def test_corrupt_row_group_fails_its_shards_only_and_resumes(synth_dir, tmp_path, client):
    src = _copy_sources(synth_dir, tmp_path / "src")
    target = src / "train-00000-of-00003.parquet"
    good = target.read_bytes()
    meta = pq.ParquetFile(target).metadata
    offset = meta.row_group(2).column(2).data_page_offset  # rows 200..299 of the first file
    with open(target, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 32)
    url = str(tmp_path / "cat.zarr")
    with pytest.raises(StageError) as err:
        ingest([str(src)], url, shard_len=SHARD_LEN, client=client, progress=False)
    assert "train-00000-of-00003.parquet: cannot read rows" in str(err.value)
    stage = f"ingest/{make_plan([str(src)], shard_len=SHARD_LEN).id}"
    done = catalog.done_shards(url, stage)
    bad = {s for s in range(-(-N_IMAGES // SHARD_LEN)) if s * SHARD_LEN < 300 and (s + 1) * SHARD_LEN > 200}
    assert bad == {3, 4} and done == set(range(-(-N_IMAGES // SHARD_LEN))) - bad
    target.write_bytes(good)  # the file is repaired (same size and rows): the rerun finishes the job
    report = ingest([str(src)], url, client=client, progress=False)
    assert report.shards_written == 2 and report.shards_skipped == len(done)
    status = open_catalog(url)["status"].values
    assert (status != "").all()


def test_unknown_scheme_is_refused(synth_dir, client):
    with pytest.raises(CatalogError, match="unknown URL scheme 'nosuch://'"):
        ingest([str(synth_dir)], "nosuch://bucket/cat.zarr", client=client, progress=False)


def test_creation_cut_short_is_finished_by_the_rerun(synth_dir, clean_catalog, client, tmp_path):
    _, _, clean_sums = clean_catalog
    url = tmp_path / "cat.zarr"
    plan = make_plan([str(synth_dir)], shard_len=SHARD_LEN)
    catalog.create(str(url), n_rows=plan.rows, shard_len=SHARD_LEN, plans=[_plan_record(plan)])
    for name in ("lat", "image_bytes", "status"):  # as if the process died while creating arrays
        shutil.rmtree(url / name)
    with pytest.raises(CatalogError, match="lacks arrays"):
        catalog.open_group(str(url))
    report = ingest([str(synth_dir)], str(url), client=client, progress=False)
    assert report.shards_written == report.shards_total
    assert catalog.checksums(str(url)) == clean_sums


@pytest.mark.parametrize("shard_len", [0, -256, 300])
def test_a_shard_length_that_cannot_be_is_refused_before_anything(synth_dir, tmp_path, shard_len):
    url = str(tmp_path / "cat.zarr")
    with pytest.raises(InputError, match=f"shard length {shard_len}: must be"):
        ingest([str(synth_dir)], url, shard_len=shard_len, progress=False)
    assert not catalog.exists(url)


def test_inputs_are_a_set_a_file_reached_twice_is_read_once(synth_dir, client, tmp_path):
    one_file = sorted(synth_dir.glob("*.parquet"))[0]
    (tmp_path / "link").symlink_to(synth_dir)
    url = str(tmp_path / "cat.zarr")
    report = ingest([str(synth_dir), str(synth_dir), str(one_file), str(tmp_path / "link"),
                     f"{synth_dir}/../{synth_dir.name}"], url, shard_len=SHARD_LEN, client=client, progress=False)
    assert report.rows == (0, N_IMAGES)
    ids = catalog.open_group(url)["image_id"][:]
    assert len(set(ids)) == len(ids) == N_IMAGES


def test_samples_from_a_parquet_column_a_pattern_or_a_name(synth_dir, clean_catalog, tmp_path, client):
    """Planktonzilla shards carry no sample: a lab's shard may have a ``sample`` column; else the ingest is told
    which record column holds it (cut by a pattern, rows it does not match flagged) or one name for all."""
    from typer.testing import CliRunner

    from pzscale.cli import app

    assert set(open_catalog(clean_catalog[0])["sample"].values.tolist()) == {""}  # Planktonzilla's: unknown
    name = "train-00000-of-00003.parquet"
    table = pq.read_table(synth_dir / name)
    paths = table.column("original_path").to_pylist()
    paths[:3] = ["no-folder.png"] * 3  # the pattern below does not match these
    table = table.set_column(table.column_names.index("original_path"), "original_path", [paths])
    (tmp_path / "own").mkdir()
    pq.write_table(table.append_column("sample", [[f"tow {i % 4}" for i in range(table.num_rows)]]),
                   tmp_path / "own" / name)
    (tmp_path / "plain").mkdir()
    pq.write_table(table, tmp_path / "plain" / name)

    url = str(tmp_path / "own.zarr")
    ingest([str(tmp_path / "own")], url, shard_len=SHARD_LEN, client=client, progress=False)
    assert open_catalog(url)["sample"].values.tolist() == [f"tow {i % 4}" for i in range(table.num_rows)]

    url = str(tmp_path / "pattern.zarr")
    ingest([str(tmp_path / "plain")], url, shard_len=SHARD_LEN, client=client, progress=False,
           sample_column="original_path", sample_pattern=r"^/([^/]+)/")
    ds = open_catalog(url)
    sample, label, qc = (ds[v].values for v in ("sample", "original_label", "qc"))
    assert sample[:3].tolist() == [""] * 3 and all("sample_unmatched" in q.split(";") for q in qc[:3])
    assert (sample[3:] == label[3:]).all() and not any("sample_unmatched" in q for q in qc[3:])

    url = str(tmp_path / "named.zarr")
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "plain"), "--catalog", url, "--sample", "net tow 5",
                                      "--scheduler", client.scheduler.address])
    assert result.exit_code == 0, result.output
    assert set(open_catalog(url)["sample"].values.tolist()) == {"net tow 5"}

    for kwargs, message in (({"sample": "a", "sample_column": "ObjID"}, "not both"),
                            ({"sample_column": "station"}, "'station': not a record column"),
                            ({"sample_column": "ObjID", "sample_pattern": "(unclosed"}, "not a regular expression"),
                            ({"sample_pattern": "x"}, "needs a sample column")):
        bad = str(tmp_path / "bad.zarr")
        with pytest.raises(InputError, match=message):
            ingest([str(tmp_path / "plain")], bad, client=client, progress=False, **kwargs)
        assert not catalog.exists(bad)
