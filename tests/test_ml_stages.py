"""Split -> train -> embed/classify -> evaluate on synthetic data, on CPU, on real clusters."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from distributed import Client, LocalCluster

from pzscale import catalog, open_catalog
from pzscale.classify import classify, names, predictions
from pzscale.dedup import DEFAULT_EPS, dedup
from pzscale.embed import embed
from pzscale.evaluate import evaluate, scores
from pzscale.ingest import ingest
from pzscale.ml.inference import DecodedAhead, decode_rows, in_batches, rank_groups
from pzscale.ml.models import ModelCard, load_model
from pzscale.schema import RANKS
from pzscale.split import assign_splits
from pzscale.synth import synth
from pzscale.train import train

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(clean_catalog, tmp_path_factory):
    """The clean synthetic catalog with a split and a built-in model trained on it."""
    work = tmp_path_factory.mktemp("ml")
    url = str(work / "cat.zarr")
    shutil.copytree(clean_catalog[0], url)
    counts = assign_splits(url, seed=42)
    model_dir = str(work / "model")
    card = train(url, model_dir, epochs=12, seed=0, log=lambda *_: None)
    return url, model_dir, card, counts


def test_split_is_stratified_and_recorded(trained):
    url, _, _, counts = trained
    ds = open_catalog(url)[["split", "source", "lineage", "proposed_label", "status"]].compute()
    labelled = (ds["status"] == "ok").values
    assert set(counts) == {"train", "val", "test", ""}
    assert abs(counts["train"] / labelled.sum() - 0.6) < 0.03
    frame = ds.to_dataframe()
    frame = frame[frame["split"] != ""]
    for (_, _), group in frame.groupby(["source", "lineage"]):
        if len(group) >= 20:
            assert abs((group["split"] == "test").mean() - 0.2) < 0.06
    assert catalog.metadata(catalog.open_group(url))["stages"]["split"]["seed"] == 42
    again = assign_splits(url, seed=42)
    assert again == counts


def test_builtin_model_reaches_macro_f1_09_at_the_deepest_rank(trained, client, tmp_path):
    pristine, model_dir, card, _ = trained
    url = str(tmp_path / "cat.zarr")  # the fixture's catalog stays without predictions
    shutil.copytree(pristine, url)
    report = classify(url, model_dir, client=client, progress=False)
    assert report.rows_computed == catalog.n_rows_of(catalog.open_group(url))
    table = evaluate(url, card.id, split="test")
    deepest = table.set_index("rank").loc["species"]
    assert deepest["macro_f1"] >= 0.9, table
    ds = open_catalog(url)
    n = names(card)
    assert ds[n["topk_label"]].shape[1] == min(5, len(card.classes))
    ok = ds["status"].values == "ok"
    probs = ds[n["topk_prob"]].values[ok]
    assert np.all(np.diff(probs, axis=1) <= 1e-6) and np.all(probs.sum(1) <= 1 + 1e-5)
    assert (ds[n["label"]].values[~ok] == "").all()
    # the kingdom prediction is the first word of a lineage the model knows
    kingdoms = {c.split()[0] for c in card.classes}
    assert set(ds[n["kingdom"]].values[ok]) <= kingdoms
    # back-off: the deepest rank reaching 0.5, its rank where its lineage ends; the next rank below 0.5
    label, rank = ds[n["backoff_label"]].values[ok], ds[n["backoff_rank"]].values[ok]
    rank_probs = np.stack([ds[n[f"{r}_prob"]].values[ok] for r in RANKS], axis=1)
    rank_labels = np.stack([ds[n[r]].values[ok] for r in RANKS], axis=1)
    deepest = (rank_probs >= 0.5).sum(axis=1) - 1
    reached = deepest >= 0
    assert reached.mean() > 0.9 and (label[~reached] == "").all()
    assert (label[reached] == rank_labels[reached, deepest[reached]]).all()
    assert all(RANKS.index(r) == len(lab.split()) - 1 for lab, r in zip(label[reached], rank[reached], strict=True))


def test_embeddings_identical_with_one_and_two_workers(trained, tmp_path):
    url, model_dir, card, _ = trained
    results = []
    for workers in (1, 2):
        copy = str(tmp_path / f"w{workers}.zarr")
        shutil.copytree(url, copy)
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as c, \
                Client(c) as cl:
            embed(copy, model_dir, client=cl, progress=False)
        results.append(open_catalog(copy)[f"emb__{card.id}"].values)
    assert results[0].dtype == np.float16 and results[0].shape[1] == card.embed_dim
    np.testing.assert_array_equal(results[0], results[1])
    ok = open_catalog(url)["status"].values == "ok"
    assert np.isfinite(results[0][ok]).all() and np.isnan(results[0][~ok]).all()


def test_semantic_dedup_on_the_trained_models_embeddings(trained, synth_dir, client, tmp_path):
    url = str(tmp_path / "cat.zarr")
    shutil.copytree(trained[0], url)
    model_dir, card = trained[1], trained[2]
    embed(url, model_dir, client=client, progress=False)
    report = dedup(url, methods="semantic", client=client, progress=False)
    ds = open_catalog(url)[["image_id", "status", "dup_semantic", f"emb__{card.id}"]].compute()
    groups, ok = ds["dup_semantic"].values, ds["status"].values == "ok"
    assert (groups[~ok] == -1).all() and (groups[ok] >= 0).all()
    row = {k: i for i, k in enumerate(ds["image_id"].values)}
    truth = json.loads((synth_dir / "truth.json").read_text())
    exact = [(row[d["copy_of"]], row[d["image_id"]]) for d in truth["duplicates"] if d["kind"] == "exact"]
    assert all(groups[a] == groups[b] for a, b in exact)  # the same pixels embed the same
    # every grouped row has a partner in its group above the threshold, by an independent cosine
    x = ds[f"emb__{card.id}"].values[ok].astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim, g = x @ x.T, groups[ok]
    np.fill_diagonal(sim, -1)
    same = g[:, None] == g[None, :]
    grouped = np.bincount(g)[g] > 1
    assert ((sim * same).max(axis=1)[grouped] > 1 - DEFAULT_EPS - 1e-5).all()  # float32 vs float64 rounding
    assert report.per_method["semantic"]["duplicates"] == int(grouped.sum() - len(np.unique(g[grouped])))


def test_reclassify_after_append_computes_only_new_rows(trained, client, tmp_path):
    url, model_dir, card, _ = trained
    copy = str(tmp_path / "cat.zarr")
    shutil.copytree(url, copy)
    classify(copy, model_dir, client=client, progress=False)
    n = names(card)
    before = open_catalog(copy)[[n["label"], n["species_prob"]]].compute()
    cruise = tmp_path / "cruise"
    synth(cruise, images=150, seed=5)
    old_rows = catalog.n_rows_of(catalog.open_group(copy))
    ingest([str(cruise)], copy, append=True, client=client, progress=False)
    report = classify(copy, model_dir, client=client, progress=False)
    assert report.rows_computed == 150
    after = open_catalog(copy)[[n["label"], n["species_prob"]]].compute()
    np.testing.assert_array_equal(after[n["label"]].values[:old_rows], before[n["label"]].values)
    np.testing.assert_array_equal(after[n["species_prob"]].values[:old_rows], before[n["species_prob"]].values)
    new_ok = open_catalog(copy)["status"].values[old_rows:] == "ok"
    assert (after[n["label"]].values[old_rows:][new_ok] != "").all()
    assert classify(copy, model_dir, client=client, progress=False).rows_computed == 0


def test_killed_classify_resumes(trained, client, tmp_path):
    url, model_dir, card, _ = trained
    reference = str(tmp_path / "ref.zarr")
    shutil.copytree(url, reference)
    classify(reference, model_dir, client=client, progress=False)
    copy = str(tmp_path / "cat.zarr")
    shutil.copytree(url, copy)
    stage = f"classify/{card.id}"
    job = subprocess.Popen([sys.executable, "-m", "pzscale.cli", "classify", "--catalog", copy, "--model", model_dir,
                            "--workers", "1", "--batch-size", "16"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(catalog.done_shards(copy, stage)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    done = catalog.done_shards(copy, stage)
    total = len(catalog.shard_ranges(0, catalog.n_rows_of(catalog.open_group(copy)), 64))
    assert 2 <= len(done) < total, "the run was not interrupted midway"
    report = classify(copy, model_dir, client=client, progress=False)
    assert report.shards_skipped == len(done) and report.shards_written == total - len(done)
    sums, ref = catalog.checksums(copy), catalog.checksums(reference)
    assert {k: v for k, v in sums.items() if k.startswith("pred__")} == {
        k: v for k, v in ref.items() if k.startswith("pred__")}


def test_tasks_go_to_gpu_workers_when_the_cluster_has_them(trained, tmp_path):
    """Workers advertising GPU=1 (as dask-cuda workers started with --resources GPU=1) get the tasks."""
    url, model_dir, card, _ = trained
    copy = str(tmp_path / "cat.zarr")
    shutil.copytree(url, copy)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, resources={"GPU": 1},
                      dashboard_address=":0") as c, Client(c) as cl:
        report = embed(copy, model_dir, client=cl, progress=False)
        assert report.shards_written == report.shards_total


def test_head_on_stored_embeddings_of_another_model(trained, client, tmp_path):
    url, model_dir, card, _ = trained
    copy = str(tmp_path / "cat.zarr")
    shutil.copytree(url, copy)
    embed(copy, model_dir, client=client, progress=False)
    probe_dir = str(tmp_path / "probe")
    probe = train(copy, probe_dir, name="probe", backbone_dir=model_dir, head="mlp", epochs=10,
                  log=lambda *_: None)
    assert ModelCard.load(probe_dir).head == "mlp" and probe.id != card.id
    classify(copy, probe_dir, client=client, progress=False)
    classify(copy, model_dir, client=client, progress=False)
    both = [v for v in open_catalog(copy).data_vars if v.endswith("__label")]
    assert sorted(both) == sorted([f"pred__{card.id}__label", f"pred__{probe.id}__label"])  # side by side
    assert evaluate(copy, probe.id).set_index("rank").loc["kingdom", "accuracy"] > 0.8


def test_out_of_memory_halves_the_batch():
    calls = []

    def run(a, b):
        calls.append(b - a)
        if b - a > 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated: no GPU here)")
        return list(range(a, b))

    out = in_batches(run, 50, 64)
    assert [i for part in out for i in part] == list(range(50))
    assert calls[:4] == [50, 32, 16, 8] and max(calls[4:]) <= 8


def test_per_rank_predictions_sum_probabilities_by_lineage_prefix():
    classes = ["animalia arthropoda copepoda calanoida", "animalia arthropoda copepoda cyclopoida",
               "chromista ochrophyta", "detritus"]
    probs = np.array([[0.3, 0.3, 0.35, 0.05], [0.0, 0.0, 0.1, 0.9]])
    out = predictions(probs, classes, top_k=2)
    assert list(out["label"]) == ["chromista ochrophyta", "detritus"]
    assert list(out["kingdom"]) == ["animalia", "detritus"]
    assert out["kingdom_prob"][0] == pytest.approx(0.6)
    assert list(out["order"]) == ["chromista ochrophyta", "detritus"]  # shorter lineages keep their full text
    assert out["topk_label"].shape == (2, 2)


def test_predictions_are_bit_for_bit_the_full_sort_and_add_at_reference():
    """The top-k partition and the ordered rank sums give exactly what a full stable argsort and
    np.add.at gave: ties (across the k-th place too), a NaN row, one-member and large groups."""
    rng = np.random.default_rng(0)
    classes = [f"k{i % 2} p{i % 5} c{i % 11} o{i % 17} f{i % 29} g{i % 37} s{i}" for i in range(60)] + ["detritus"]
    logits = rng.normal(size=(300, len(classes))) * rng.uniform(0.1, 8, size=(300, 1))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
    probs[:20] = np.float32(1 / len(classes))  # every class tied
    probs[20:40] = np.round(probs[20:40], 2)  # ties across the 5th place
    probs[40, 3] = np.nan
    for top_k in (1, 5, len(classes), len(classes) + 3):
        out = predictions(probs, classes, top_k=top_k)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :min(top_k, len(classes))]
        assert (out["topk_label"] == np.array(classes, dtype=object)[order]).all()
        assert out["topk_prob"].tobytes() == np.take_along_axis(probs, order, 1).tobytes()
    for rank, (prefixes, index) in rank_groups(classes).items():
        summed = np.zeros((len(probs), len(prefixes)), np.float64)
        np.add.at(summed.T, index, probs.T)
        best = summed.argmax(1)
        assert (out[rank] == np.array(prefixes, dtype=object)[best]).all()
        assert out[f"{rank}_prob"].tobytes() == summed[np.arange(len(probs)), best].astype(np.float32).tobytes()


class _Rows:
    """The two arrays decode_rows reads, as numpy stand-ins for the Zarr arrays."""

    class _Bytes:
        def __init__(self, values):
            self.values = values

        def get_orthogonal_selection(self, selection):
            return self.values[selection[0]]

    def __init__(self, status, encoded):
        self.arrays = {"status": np.array(status, dtype=object), "image_bytes": self._Bytes(np.array(encoded, object))}

    def __getitem__(self, name):
        return self.arrays[name]


def _png(array) -> bytes:
    from io import BytesIO

    from PIL import Image

    out = BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def test_decoding_ahead_gives_the_plain_decode_in_order():
    """decode_rows(ahead=...) (a background thread, chunk by chunk) returns the rows and pixels of the
    plain decode, in order, whatever slices the model takes; rows that did not decode at ingest are
    skipped by both, and bytes that fail to decode raise the same error when their chunk is reached."""
    rng = np.random.default_rng(1)
    shapes = [(7, 5), (9, 9, 3), (4, 11, 4), (12, 3), (6, 6, 3)]
    encoded, status = [], []
    for i in range(23):
        shape = shapes[i % len(shapes)]
        encoded.append(_png(rng.integers(0, 256, size=shape, dtype=np.uint8)))
        status.append("ok" if i % 6 else "error")
    encoded[6] = b""  # failed at ingest: never decoded
    group = _Rows(status, encoded)
    ok, plain = decode_rows(group, 2, 23)
    for chunk in (1, 4, 64):
        ok_ahead, ahead = decode_rows(group, 2, 23, ahead=chunk)
        assert isinstance(ahead, DecodedAhead) and (ok_ahead == ok).all() and len(ahead) == len(plain)
        taken = [*ahead[0:3], *ahead[3:11], *ahead[11:]]  # batches as forward slices them
        assert ahead[-1] is taken[-1]
        assert all(a.dtype == b.dtype and a.shape == b.shape and (a == b).all()
                   for a, b in zip(taken, plain, strict=True))
        ahead.close()
    assert len(decode_rows(group, 0, 1, ahead=4)[1]) == 0  # a range with no decodable row
    broken = _Rows(["ok"] * 6, [_png(np.zeros((4, 4), np.uint8))] * 5 + [b"\x89PNG\r\n\x1a\n truncated"])
    with pytest.raises(OSError) as plain_error:
        decode_rows(broken, 0, 6)
    ok_ahead, ahead = decode_rows(broken, 0, 6, ahead=4)
    assert [p.shape for p in ahead[0:4]] == [(4, 4)] * 4  # the chunk before the broken one is served
    with pytest.raises(type(plain_error.value)):
        ahead[4:6]
    ahead.close()


def test_scores_truncate_lineages_per_rank():
    truth = ["animalia arthropoda copepoda calanoida", "animalia arthropoda copepoda cyclopoida", "detritus"]
    pred = ["animalia arthropoda copepoda cyclopoida", "animalia arthropoda copepoda cyclopoida", "detritus"]
    table = scores(truth, pred).set_index("rank")
    assert table.loc["class", "accuracy"] == 1.0 and table.loc["order", "accuracy"] == pytest.approx(2 / 3)


def test_fine_tune_a_saved_backbone_end_to_end(trained, client, tmp_path):
    """Any model directory's backbone can be fine-tuned with a new head on the images."""
    url, model_dir, card, _ = trained
    tuned_dir = str(tmp_path / "tuned")
    tuned = train(url, tuned_dir, name="tuned", backbone_dir=model_dir, fine_tune=True, epochs=3, lr=1e-3,
                  log=lambda *_: None)
    assert tuned.kind == card.kind and tuned.image_size == card.image_size and tuned.classes == card.classes
    assert tuned.extra["fine_tuned_from"] == model_dir
    before = load_model(model_dir).backbone.state_dict()
    after = load_model(tuned_dir).backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the backbone itself was trained
    copy = str(tmp_path / "cat.zarr")
    shutil.copytree(url, copy)
    classify(copy, tuned_dir, client=client, progress=False)
    assert evaluate(copy, tuned.id).set_index("rank").loc["species", "macro_f1"] > 0.8


def test_a_model_retrained_into_the_same_directory_is_not_served_stale(trained, tmp_path):
    from pzscale.ml.inference import model_on_worker

    _, model_dir, _, _ = trained
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    first = model_on_worker(str(copy))
    assert model_on_worker(str(copy)) is first  # cached
    card = ModelCard.load(copy)
    card.version = "2"
    time.sleep(0.01)
    card.save(copy)
    second = model_on_worker(str(copy))
    assert second is not first and second.card.version == "2"


def test_bf16_autocast_embeddings_match_fp32_and_are_recorded(trained, client, tmp_path):
    """bf16 (the GPU benchmark's precision) changes the numbers a little, never the meaning."""
    url, model_dir, card, _ = trained
    runs = {}
    for precision in ("fp32", "bf16"):
        copy = str(tmp_path / f"{precision}.zarr")
        shutil.copytree(url, copy)
        embed(copy, model_dir, client=client, precision=precision, progress=False)
        runs[precision] = open_catalog(copy)[f"emb__{card.id}"].values.astype(np.float32)
        stages = catalog.metadata(catalog.open_group(copy))["stages"]
        assert stages[f"embed/{card.id}"]["precision"] == precision
    ok = np.isfinite(runs["fp32"]).all(axis=1)
    a, b = runs["fp32"][ok], runs["bf16"][ok]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99
    assert not np.array_equal(a, b)  # autocast really ran in bf16


def test_unknown_precision_fails_before_any_write(trained, client, tmp_path):
    from pzscale.errors import StageError

    url, model_dir, card, _ = trained
    copy = str(tmp_path / "bad.zarr")
    shutil.copytree(url, copy)
    with pytest.raises(StageError, match="precision must be one of"):
        embed(copy, model_dir, client=client, precision="int3", progress=False)
    assert not catalog.done_shards(copy, f"embed/{card.id}")


def test_backoff_is_the_deepest_confident_rank_and_rederived_at_another_threshold(trained, client, tmp_path):
    from pzscale.classify import backoff, store_backoff
    from pzscale.stage import Catalog

    labels = {r: np.array([" ".join(["animalia", "arthropoda", "copepoda", "calanoida"][: i + 1])] * 2, dtype=object)
              for i, r in enumerate(RANKS)}  # an order-level class: its label stops growing after order
    probs = {r: np.array([0.9 - 0.1 * i, 0.3], np.float32) for i, r in enumerate(RANKS)}
    label, rank = backoff(labels, probs, 0.5)
    assert label.tolist() == ["animalia arthropoda copepoda calanoida", ""] and rank.tolist() == ["order", ""]
    # probabilities 0.9 .. 0.3 by rank: at 0.65 the deepest reaching it is class (0.7)
    assert backoff(labels, probs, 0.65)[0].tolist() == ["animalia arthropoda copepoda", ""]

    pristine, model_dir, card, _ = trained
    url = str(tmp_path / "cat.zarr")
    shutil.copytree(pristine, url)
    classify(url, model_dir, client=client, progress=False)
    n = names(card)
    before = open_catalog(url)[n["backoff_label"]].values
    again = store_backoff(Catalog.open(url), card, 0.5, client=client, progress=False)
    assert again.shards_written == 0  # done at this threshold
    stricter = store_backoff(Catalog.open(url), card, 0.99, client=client, progress=False)
    assert stricter.shards_written == stricter.shards_total > 0
    after = open_catalog(url)[n["backoff_label"]].values
    depth = np.array([len(t.split()) for t in after]) <= np.array([len(t.split()) for t in before])
    assert depth.all() and (after != before).any()  # never deeper at a stricter threshold; some shallower
