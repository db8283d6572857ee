"""A lab's own classified images in class folders (torchvision's ImageFolder layout), with no taxonomy
table: the folder names are the labels, trained on and predicted as they are, and listed as unmapped."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from pzscale import open_catalog
from pzscale.classify import classify
from pzscale.cli import app
from pzscale.evaluate import evaluate
from pzscale.ingest import ingest
from pzscale.split import assign_splits
from pzscale.train import train

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
CLASSES = ("Chaetoceros_chain", "Noctiluca", "round_detritus")
PER_CLASS = 60


def _draw(kind: str, rng: np.random.Generator) -> Image.Image:
    """Dark-field shapes with random size, position and noise: a chain of cells, a big ring, a blob."""
    size = int(rng.integers(56, 80))
    img = Image.new("L", (size, size), 10)
    draw = ImageDraw.Draw(img)
    cx, cy, r = size / 2 + rng.normal(0, 3), size / 2 + rng.normal(0, 3), size * rng.uniform(0.25, 0.35)
    if kind == "Chaetoceros_chain":
        for k in range(-2, 3):
            x = cx + k * size * 0.16
            draw.ellipse([x - 4, cy - 4, x + 4, cy + 4], fill=210)
        draw.line([cx - size * 0.4, cy, cx + size * 0.4, cy], fill=160, width=1)
    elif kind == "Noctiluca":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=230, width=3)
    else:
        draw.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=120)
    pixels = np.asarray(img, np.float32) + rng.normal(0, 12, (size, size))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab") / "my_classified_images"
    rng = np.random.default_rng(5)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True)
        for i in range(PER_CLASS):
            _draw(kind, rng).save(root / kind / f"{kind.lower()}_{i:03d}.png")
    return root


def test_class_folders_without_a_taxonomy_train_and_classify_with_folder_names(folders, client, tmp_path):
    url, model = str(tmp_path / "cat.zarr"), str(tmp_path / "model")
    ingest([str(folders)], url, source="mylab", shard_len=64, client=client, progress=False)
    # the folder names are unmapped raw labels: the taxonomy report lists them, info counts them
    report = CliRunner().invoke(app, ["taxonomy", "report", "-c", url])
    assert report.exit_code == 0, report.output
    assert f"unmapped (source, raw label): 3 pair(s), {3 * PER_CLASS} images" in report.output
    assert all(f"mylab {name}" in " ".join(report.output.split()) for name in CLASSES)
    info = CliRunner().invoke(app, ["info", url, "--json"])
    assert '"with_raw_label_only": 180' in info.output
    # ... and they are the training target
    counts = assign_splits(url, seed=1)
    assert counts.get("", 0) == 0 and counts["train"] >= 0.55 * 3 * PER_CLASS and counts["test"] > 0
    card = train(url, model, epochs=30, image_size=48, seed=0, log=lambda *_: None)
    assert sorted(card.classes) == sorted(CLASSES)
    classify(url, model, client=client, progress=False)
    scores = evaluate(url, card.id, split="test")
    deepest = scores.iloc[-1]
    assert deepest["images"] == counts["test"] and deepest["accuracy"] >= 0.8, scores
    ds = open_catalog(url)
    assert set(np.unique(ds[f"pred__{card.id}__label"].values)) <= set(CLASSES)
