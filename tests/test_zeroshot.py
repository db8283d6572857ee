"""CLIP model directories and the zero-shot stage: loading (safely, nothing downloaded), refusals, and the
stage on a real cluster against a direct in-process computation; resumable, recomputed when classes change."""

import copy
import shutil

import numpy as np
import open_clip
import pytest
import torch

from pzscale import catalog, open_catalog
from pzscale.clip_train import TINY_ARCHITECTURE, TINY_CONFIG, has_text_tower, load_clip, random_clip
from pzscale.errors import ModelError
from pzscale.ml.models import ModelCard, OpenClipImageTower, save_model
from pzscale.ml.preprocess import prepare_batch
from pzscale.split import assign_splits
from pzscale.train import GREY_MEAN, GREY_STD
from pzscale.zeroshot import classes_present, names, prompts, zeroshot

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("one_torch_thread")]



@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("clip") / "random"
    random_clip(model_dir, seed=1)
    torch.manual_seed(1)  # random_clip draws the same weights from this seed
    return str(model_dir), open_clip.CLIP(**copy.deepcopy(TINY_CONFIG))


def test_load_clip_round_trip(tiny_clip):
    model_dir, model = tiny_clip
    assert has_text_tower(model_dir)
    loaded = load_clip(model_dir)
    assert loaded.card.architecture == TINY_ARCHITECTURE
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value)
    text = loaded.encode_texts(prompts(["animalia chaetognatha", "bubble"]))
    assert text.shape == (2, TINY_CONFIG["embed_dim"])
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert loaded.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))


def test_models_that_cannot_do_zero_shot_are_refused(tmp_path, trained_cnn_dir, tiny_clip):
    tower = tmp_path / "tower"
    card = ModelCard.load(tiny_clip[0])
    save_model(tower, card, OpenClipImageTower(tiny_clip[1].visual))
    assert not has_text_tower(tower)
    with pytest.raises(ModelError, match="only the image tower"):
        load_clip(tower)
    assert not has_text_tower(trained_cnn_dir)
    with pytest.raises(ModelError, match="no text tower"):
        load_clip(trained_cnn_dir)
    # a built-in config whose text tower is a Hugging Face model would download its tokenizer
    card = ModelCard.load(tower)
    card.architecture, card.extra = "roberta-ViT-B-32", {}
    card.save(tower)
    with pytest.raises(ModelError, match="downloaded"):
        load_clip(tower)


@pytest.fixture(scope="module")
def trained_cnn_dir(tmp_path_factory):
    """A builtin-kind model directory (untrained weights are enough to be refused)."""
    from pzscale.ml.models import builtin_backbone

    model_dir = tmp_path_factory.mktemp("cnn") / "cnn"
    card = ModelCard(name="cnn", version="1", kind="builtin", architecture="pzcnn-small", embed_dim=128,
                     image_size=64, mean=GREY_MEAN, std=GREY_STD)
    save_model(model_dir, card, builtin_backbone(128))
    return str(model_dir)


@pytest.fixture(scope="module")
def split_catalog(clean_catalog, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("zs") / "cat.zarr")
    shutil.copytree(clean_catalog[0], url)
    assign_splits(url, seed=42)
    return url


def _direct(model_dir, url, rows, classes):
    """Zero-shot predictions computed in this process, image by image, for comparison with the stage."""
    loaded = load_clip(model_dir)
    pixels = catalog.read_images(url, rows)
    x, _ = prepare_batch(pixels, size=64, mean=GREY_MEAN, std=GREY_STD)
    image = torch.nn.functional.normalize(loaded.encode_images(x), dim=-1)
    return np.array(classes, dtype=object)[(image @ loaded.encode_texts(prompts(classes)).T).argmax(-1).numpy()]


def test_zeroshot_stage_predicts_each_split_among_its_classes(split_catalog, tiny_clip, client, tmp_path):
    model_dir, _ = tiny_clip
    url = str(tmp_path / "cat.zarr")
    shutil.copytree(split_catalog, url)
    classes = classes_present(url, ("test", "val"))
    classes["val"] = classes["val"][:3]  # a smaller class set for val: its rows must be predicted among these
    report = zeroshot(url, model_dir, classes=classes, client=client, progress=False)
    assert report.rows_computed == catalog.n_rows_of(catalog.open_group(url))
    n = names(ModelCard.load(model_dir))
    ds = open_catalog(url)[["split", "status", n["label"], n["prob"], n["embedding"]]].compute()
    split, ok = ds["split"].values, ds["status"].values == "ok"
    for name in ("test", "val"):
        rows = np.flatnonzero((split == name) & ok)
        np.testing.assert_array_equal(ds[n["label"]].values[rows], _direct(model_dir, url, rows, classes[name]))
        assert set(ds[n["label"]].values[rows]) <= set(classes[name])
    others = ~np.isin(split, ["test", "val"]) | ~ok
    assert (ds[n["label"]].values[others] == "").all() and np.isnan(ds[n["embedding"]].values[others]).all()
    assert np.isfinite(ds[n["embedding"]].values[~others]).all()
    probs = ds[n["prob"]].values[~others]
    assert ((probs > 0) & (probs <= 1)).all()
    record = catalog.metadata(catalog.open_group(url))["stages"][n["stage"]]
    assert record["classes"] == {k: len(v) for k, v in classes.items()} and record["template"] == "a photo of a {}"
    assert catalog.get_json(url, record["class_lists"].split("/", 1)[1])["classes"] == classes
    # resumable: nothing left to do; new class sets (one list for every row) recompute every shard
    assert zeroshot(url, model_dir, classes=classes, client=client, progress=False).rows_computed == 0
    everything = sorted(set(classes["test"]) | set(classes["val"]))
    again = zeroshot(url, model_dir, classes=everything, client=client, progress=False)
    assert again.shards_skipped == 0
    labels = open_catalog(url)[n["label"]].values
    assert (labels[ok] != "").all() and set(labels[ok]) <= set(everything)


def test_pickled_checkpoint_loads_with_weights_only(tiny_clip, tmp_path):
    """A torch.save checkpoint ({"state_dict": ...}, as open_clip_train writes) loads through the same path."""
    model_dir, model = tiny_clip
    card = ModelCard.load(model_dir)
    card.weights = {"backbone": "epoch_5.pt"}
    card.save(tmp_path)
    torch.save({"epoch": 5, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "epoch_5.pt")
    assert has_text_tower(tmp_path)
    loaded = load_clip(tmp_path)
    torch.testing.assert_close(loaded.model.state_dict()["text_projection"], model.state_dict()["text_projection"])
