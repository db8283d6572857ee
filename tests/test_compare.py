"""The Planktonzilla comparison on synthetic data with two held-out sources whose classes are partly absent
from the others: the paper's split (and its dedup-aware variant), CLIP-style training, zero-shot, SimpleShot and
the one table, on a real cluster; a random ViT-B-16 through ``pzscale compare`` as a user runs BioCLIP."""

import json
import shutil

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pzscale import catalog, open_catalog
from pzscale.cli import app
from pzscale.clip_train import random_clip
from pzscale.compare import COLUMNS, compare
from pzscale.errors import CatalogError
from pzscale.ingest import ingest
from pzscale.ml.models import ModelCard, import_checkpoint
from pzscale.schema import RANKS
from pzscale.split import assign_splits, duplicate_components
from pzscale.synth import synth
from tests.conftest import independent_macro_f1

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


SEEN_TAXA = ["Chaetoceros", "Acantharea", "Calanoida", "detritus"]
# Coscinodiscus shares three ranks with Chaetoceros and Chaetognatha the kingdom with Calanoida; Calanoida
# also occurs in the held-out sources, so those rows are a seen class and leave the unseen benchmark.
HELD_OUT_TAXA = ["Coscinodiscus", "Chaetognatha", "bubble", "Calanoida"]
SOURCE_TAXA = {"synth_ifcb": SEEN_TAXA, "synth_zooscan": SEEN_TAXA,
               "synth_uvp5": HELD_OUT_TAXA, "synth_planktoscope": HELD_OUT_TAXA}
HELD_OUT = ("synth_uvp5", "synth_planktoscope")


def _held_out_catalog(tmp_path_factory, client, images, seed):
    work = tmp_path_factory.mktemp("heldout")
    synth(work / "parquet", images=images, seed=seed, source_taxa=SOURCE_TAXA)
    url = str(work / "cat.zarr")
    ingest([str(work / "parquet")], url, shard_len=64, client=client, progress=False)
    return url, work / "parquet"


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, client):
    return _held_out_catalog(tmp_path_factory, client, 600, 3)


def _frame(url):
    ds = open_catalog(url)
    cols = [*(["split"] if "split" in ds else []), "source", "lineage", "proposed_label", "status", "image_id"]
    frame = ds[cols].compute().to_dataframe().reset_index(drop=True)
    frame["target"] = np.where(frame["lineage"] != "", frame["lineage"], frame["proposed_label"])
    frame.loc[frame["status"] != "ok", "target"] = ""
    return frame


def test_paper_split_keeps_only_classes_absent_from_training(held_out, tmp_path):
    url = str(tmp_path / "cat.zarr")
    shutil.copytree(held_out[0], url)
    counts = assign_splits(url, seed=42, unseen_sources=HELD_OUT)
    frame = _frame(url)
    labelled = frame[frame["target"] != ""]
    held = labelled[labelled["source"].isin(HELD_OUT)]
    seen = labelled[~labelled["source"].isin(HELD_OUT)]
    assert set(held["split"]) == {"unseen", "unseen_seen_class"}
    assert set(seen["split"]) == {"train", "val", "test"}
    train_classes = set(seen.loc[seen["split"] == "train", "target"])
    unseen_classes = set(held.loc[held["split"] == "unseen", "target"])
    assert unseen_classes and not unseen_classes & train_classes
    assert set(held.loc[held["split"] == "unseen_seen_class", "target"]) <= train_classes
    assert {t.split()[-1] for t in unseen_classes} == {"coscinodiscus", "chaetognatha", "bubble"}
    assert abs((seen["split"] == "train").mean() - 0.6) < 0.05 and abs((seen["split"] == "test").mean() - 0.2) < 0.05
    assert counts["unseen"] == len(held[held["split"] == "unseen"])
    record = catalog.metadata(catalog.open_group(url))["stages"]["split"]
    assert record["unseen_sources"] == list(HELD_OUT) and record["dedup"] == []


def test_dedup_aware_split_never_lets_a_duplicate_group_straddle(held_out, tmp_path):
    url = str(tmp_path / "cat.zarr")
    shutil.copytree(held_out[0], url)
    frame = _frame(url)
    n = len(frame)
    row_of = {image_id: row for row, image_id in enumerate(frame["image_id"])}
    ok = (frame["status"] == "ok").to_numpy()
    # dup_exact: the planted copies point at their original (the kept row); dup_near: extra random pairs,
    # making chains across groupings and sources, as near duplicates found by another method would
    exact = np.where(ok, np.arange(n), -1)
    for dup in json.loads((held_out[1] / "truth.json").read_text())["duplicates"]:
        a, b = row_of[dup["image_id"]], row_of[dup["copy_of"]]
        if ok[a] and ok[b]:
            exact[a] = b
    near = np.where(ok, np.arange(n), -1)
    rng = np.random.default_rng(0)
    good = np.flatnonzero(ok)
    for a, b in rng.choice(good, size=(40, 2)):
        near[max(a, b)] = min(a, b)
    group = catalog.open_group(url, mode="r+")
    for name, values in (("dup_exact", exact), ("dup_near", near)):
        catalog.ensure_array(group, name, dtype="int64", fill=-1)
        for _, start, stop in catalog.shard_ranges(0, n, 64):
            catalog.write_arrays(group, start, stop, {name: values[start:stop]})
    # components computed independently (union-find)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for links in (exact, near):
        for i, j in enumerate(links):
            if j >= 0:
                parent[find(i)] = find(j)
    component = np.array([find(i) for i in range(n)])
    assert len(set(duplicate_components(np.stack([exact, near], 1)))) == len(set(component))

    def straddling(split):
        seen = ~frame["source"].isin(HELD_OUT).to_numpy() & (frame["target"] != "").to_numpy()
        groups = pd.DataFrame({"component": component[seen], "split": split[seen]}).groupby("component")["split"]
        return int((groups.nunique() > 1).sum())

    assign_splits(url, seed=42, unseen_sources=HELD_OUT)
    assert straddling(open_catalog(url)["split"].values) > 0, "the plain split must split some groups"
    counts = assign_splits(url, seed=42, unseen_sources=HELD_OUT, dedup=True)
    split = open_catalog(url)["split"].values
    assert straddling(split) == 0
    assert counts.get("unseen_duplicate", 0) > 0
    held = frame["source"].isin(HELD_OUT).to_numpy() & (frame["target"] != "").to_numpy()
    seen_components = set(component[~frame["source"].isin(HELD_OUT).to_numpy() & (frame["target"] != "")])
    for row in np.flatnonzero(held):
        if split[row] in ("unseen", "unseen_duplicate"):
            assert (split[row] == "unseen_duplicate") == (component[row] in seen_components)
    assert catalog.metadata(catalog.open_group(url))["stages"]["split"]["dedup"] == ["dup_exact", "dup_near"]
    with pytest.raises(CatalogError, match="no array dup_semantic"):
        assign_splits(url, dedup="dup_semantic")


@pytest.fixture(scope="module")
def compared(held_out, client, tmp_path_factory):
    """compare() with a random tiny CLIP and a supervised CNN and a CLIP-style model trained here."""
    work = tmp_path_factory.mktemp("compare")
    url = str(work / "cat.zarr")
    shutil.copytree(held_out[0], url)
    random_clip(work / "random-clip", seed=1)
    table = compare(url, work / "out", models=[str(work / "random-clip")], train_objectives=("supervised", "clip"),
                    unseen_sources=HELD_OUT, epochs=5, train_options={"batch_size": 16}, client=client,
                    progress=False, log=lambda *_: None)
    return url, work / "out", table


def test_the_table_has_every_row_and_column(compared):
    _, out, table = compared
    assert list(table.columns) == list(COLUMNS)
    ids = {"random": "random-clip-1", "cnn": "pzscale-cnn-1", "clip": "pzscale-clip-1"}
    expected = {(ids[m], s, split) for split in ("seen", "unseen") for m, s in [
        ("random", "zero-shot"), ("random", "1-shot"), ("random", "5-shot"), ("cnn", "supervised"),
        ("cnn", "1-shot"), ("cnn", "5-shot"), ("clip", "clip-style"), ("clip", "1-shot"), ("clip", "5-shot")]}
    assert set(zip(table["model"], table["setting"], table["split"], strict=True)) == expected
    assert len(table) == len(expected)
    values = table[list(RANKS)].to_numpy()
    assert np.isfinite(values).all() and ((values >= 0) & (values <= 1)).all()
    pd.testing.assert_frame_equal(pd.read_csv(out / "compare.csv"), table)
    saved = json.loads((out / "compare.json").read_text())
    pd.testing.assert_frame_equal(pd.DataFrame(saved["table"]), table)
    assert {m["model"] for m in saved["models"]} == set(ids.values())
    assert saved["protocol"]["simpleshot"] == {"shots": [1, 5], "seeds": [0, 7, 25, 42, 100]}
    with Image.open(out / "compare_f1_by_rank.png") as png:
        assert png.size[0] > 600 and png.size[1] > 300


def test_clip_style_training_beats_a_random_clip_zero_shot_at_every_rank(compared):
    table = compared[2].set_index(["model", "setting", "split"])
    trained = table.loc[("pzscale-clip-1", "clip-style", "seen"), list(RANKS)]
    random = table.loc[("random-clip-1", "zero-shot", "seen"), list(RANKS)]
    assert (trained > random).all(), pd.DataFrame({"trained": trained, "random": random})
    assert trained["species"] >= 0.5  # four seen classes: chance is about 0.25


def test_simpleshot_five_shots_at_least_one_shot_on_average(compared):
    table = compared[2]
    one = table[table["setting"] == "1-shot"].set_index(["model", "split"])[list(RANKS)]
    five = table[table["setting"] == "5-shot"].set_index(["model", "split"])[list(RANKS)]
    gain = five - one.loc[five.index]
    # Per model and split the gain is noisy on this small held-out set (-0.07 to +0.06 with the synth of
    # 2026-12-03); on average five shots must not lose beyond that noise, and the embedding trained for
    # similarity (CLIP-style) must gain on both splits.
    assert gain.to_numpy().mean() >= -0.02, gain.to_string()
    assert (gain.loc["pzscale-clip-1"].mean(axis=1) > 0).all(), gain.to_string()


def test_table_f1_matches_an_independent_implementation(compared):
    url, _, table = compared
    frame = _frame(url)
    ds = open_catalog(url)
    by_key = table.set_index(["model", "setting", "split"])
    for model, setting, label in [("pzscale-clip-1", "clip-style", "pred__pzscale-clip-1__zs__label"),
                                  ("random-clip-1", "zero-shot", "pred__random-clip-1__zs__label"),
                                  ("pzscale-cnn-1", "supervised", "pred__pzscale-cnn-1__label")]:
        predicted = ds[label].values
        for name, split in (("seen", "test"), ("unseen", "unseen")):
            rows = ((frame["split"] == split) & (frame["target"] != "")).to_numpy()
            for depth, rank in enumerate(RANKS, start=1):
                expected = independent_macro_f1(frame["target"][rows].tolist(), predicted[rows].tolist(), depth)
                assert by_key.loc[(model, setting, name), rank] == pytest.approx(expected, abs=1e-12)


@pytest.fixture(scope="module")
def small_held_out(tmp_path_factory, client):
    return _held_out_catalog(tmp_path_factory, client, 60, 11)[0]  # 4 test, 19 unseen, 26 train images


def test_random_vit_b16_checkpoint_runs_zero_shot_through_pzscale_compare(small_held_out, client, tmp_path):
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    from safetensors.torch import save_file

    checkpoint = tmp_path / "open_clip_model.safetensors"  # as the hub ships BioCLIP: the whole model
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    del model
    model_dir = tmp_path / "vit-b-16"
    card = import_checkpoint(checkpoint, kind="open_clip", architecture="ViT-B-16", out_dir=model_dir,
                             name="random-vit-b-16", version="0")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compare", "--catalog", small_held_out, "--model", str(model_dir),
                                      "--unseen", HELD_OUT[0], "--unseen", HELD_OUT[1], "--out", str(out),
                                      "--batch-size", "16", "--scheduler", client.scheduler.address])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "compare.csv")
    assert set(zip(table["setting"], table["split"], strict=True)) == {
        (s, split) for s in ("zero-shot", "1-shot", "5-shot") for split in ("seen", "unseen")}
    assert (table["model"] == card.id).all()
    assert "zero-shot" in result.output and "species" in result.output
    labels = open_catalog(small_held_out)[f"pred__{card.id}__zs__label"].values
    split = open_catalog(small_held_out)["split"].values
    assert (labels[split == "test"] != "").all() and (labels[split == "unseen"] != "").all()


def test_cli_trains_a_clip_style_model(small_held_out, tmp_path):
    url = str(tmp_path / "cat.zarr")
    shutil.copytree(small_held_out, url)
    assign_splits(url, seed=42, unseen_sources=HELD_OUT)
    out = tmp_path / "clip"
    result = CliRunner().invoke(app, ["train", "--catalog", url, "--out", str(out), "--objective", "clip",
                                      "--epochs", "1"])
    assert result.exit_code == 0, result.output
    card = ModelCard.load(out)
    assert card.name == "pzscale-clip" and card.architecture == "pzscale-clip-tiny" and card.head is None
    assert card.extra["objective"] == "clip" and card.extra["open_clip_model_cfg"]["embed_dim"] == card.embed_dim
    bad = CliRunner().invoke(app, ["train", "--catalog", url, "--out", str(tmp_path / "x"), "--objective", "dino"])
    assert bad.exit_code == 1 and "unknown training objective" in bad.output
