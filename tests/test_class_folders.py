"""A lab's own classified images in class folders (torchvision's ImageFolder layout), with no taxonomy
table: the folder names are the labels, trained on and predicted as they are, and listed as unmapped."""

from __future__ import annotations

import io
import unicodedata
import warnings
import zipfile

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


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 9), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_skipped_files_unicode_folder_names_and_repeated_members_in_a_catalog(client, tmp_path):
    """Issue 17: what a class-folder input skips is in the report, 'Cératium' typed NFC and NFD is one label
    with distinct ids, and a zip holding one name twice gives two rows."""
    nfc, nfd = unicodedata.normalize("NFC", "Cératium"), unicodedata.normalize("NFD", "Cératium")
    root = tmp_path / "lab"
    for i, name in enumerate((nfc, nfd)):
        (root / name).mkdir(parents=True)
        (root / name / "x.png").write_bytes(_png(40 + i))
    (root / nfc / "drawing.svg").write_text("<svg/>")
    (root / nfc / "link.png").symlink_to(root / nfc / "x.png")
    archive = tmp_path / "twice.zip"
    with warnings.catch_warnings(), zipfile.ZipFile(archive, "w") as zf:
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns of a name written twice: that is the point
        for value in (50, 60):
            zf.writestr("top/Noctiluca/x.png", _png(value))
    url = str(tmp_path / "cat.zarr")
    report = ingest([str(root), str(archive)], url, source="mylab", shard_len=64, client=client, progress=False)
    assert report.input_notes == [
        f"{root}: 2 entries skipped: 1 .svg (vector image, not decoded), 1 symlink(s) (not followed)",
        f"{root}: 2 row(s) have names equal once Unicode-normalised (NFC): each is read as its own row, its id and "
        "path ending in '#1', '#2'... in archive order",
        f"{archive}: 2 row(s) are copies of a member name the archive holds more than once: each is read as its own "
        "row, its id and path ending in '#1', '#2'... in archive order",
    ]
    assert f"NOTE {root}: 2 entries skipped" in str(report)
    ds = open_catalog(url).drop_vars("image_bytes").compute()
    assert ds.sizes["image"] == 4 and set(ds["status"].values) == {"ok"}  # rows planned = rows read
    assert list(ds["original_label"].values) == [nfc, nfc, "Noctiluca", "Noctiluca"]  # one label, NFC
    assert len(set(ds["image_id"].values)) == 4
    assert sorted(ds["object_id"].values) == sorted([f"{nfc}/x.png#1", f"{nfc}/x.png#2", "Noctiluca/x.png#1",
                                                     "Noctiluca/x.png#2"])
    assert set(ds["qc"].values) == {""}
