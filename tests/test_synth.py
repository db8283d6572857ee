import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pzscale.schema import PARQUET_COLUMNS
from pzscale.synth import synth


def _rows(folder):
    table = pq.read_table(sorted(folder.glob("*.parquet")))
    return {f"{r['dataset']}:{r['ObjID']}": r for r in table.to_pylist()}


def _pixels(row):
    return np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])))


def test_schema_rows_and_truth(synth_dir):
    files = sorted(synth_dir.glob("*.parquet"))
    assert len(files) == 3
    schema = pq.read_schema(files[0])
    assert schema.names == list(PARQUET_COLUMNS)
    assert b"huggingface" in schema.metadata
    rows = _rows(synth_dir)
    truth = json.loads((synth_dir / "truth.json").read_text())
    assert len(rows) == truth["images"] == 1200
    assert truth["corrupt"] and truth["duplicates"]
    sources = {r["dataset"] for r in rows.values()}
    assert len(sources) >= 3
    # some sources are located and timed, others have null position
    assert any(r["Latitude"] is None for r in rows.values())
    assert any(r["Latitude"] is not None and r["timestamp"] for r in rows.values())


def test_images_vary_and_are_mostly_grey(synth_dir):
    rows = [r for r in _rows(synth_dir).values() if r["original_label"] != "detritus" or r["Kingdom"]]
    shapes, modes, formats = [], [], set()
    for r in rows[:300]:
        img = Image.open(io.BytesIO(r["image"]["bytes"]))
        shapes.append(img.size)
        modes.append(img.mode)
        formats.add(img.format)
    widths = [w for w, _ in shapes]
    assert min(widths) < 50 and max(widths) > 150
    assert formats == {"PNG", "JPEG"}
    assert modes.count("L") > 0.6 * len(modes) and "RGB" in modes


def test_planted_copies_match_truth(synth_dir):
    rows = _rows(synth_dir)
    truth = json.loads((synth_dir / "truth.json").read_text())
    cross_source = 0
    for d in truth["duplicates"]:
        copy, orig = rows[d["image_id"]], rows[d["copy_of"]]
        cross_source += copy["dataset"] != orig["dataset"]
        if d["kind"] == "exact":
            np.testing.assert_array_equal(_pixels(copy), _pixels(orig))
        else:
            a, b = _pixels(copy).astype(float), _pixels(orig).astype(float)
            assert a.shape != b.shape or not np.array_equal(a, b)
    assert cross_source > 0
    kinds = {d["kind"] for d in truth["duplicates"]}
    assert kinds == {"exact", "near"}
    for c in truth["corrupt"]:
        with pytest.raises((OSError, SyntaxError, ValueError)):
            Image.open(io.BytesIO(rows[c["image_id"]]["image"]["bytes"])).load()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    synth(a, images=60, seed=3)
    synth(b, images=60, seed=3)
    synth(c, images=60, seed=4)
    fa, fb, fc = (sorted(p.glob("*.parquet"))[0].read_bytes() for p in (a, b, c))
    assert fa == fb and fa != fc


def _phashes_and_relatives(folder):
    """pHash of every decodable row, and each row's planted family (the original it copies, or itself)."""
    from pzscale import imagehash, images

    rows = _rows(folder)
    truth = json.loads((folder / "truth.json").read_text())
    corrupt = {c["image_id"] for c in truth["corrupt"]}
    ids = [k for k in rows if k not in corrupt]
    hashes = imagehash.phashes([images.decode(rows[k]["image"]["bytes"]) for k in ids])
    family = {k: k for k in ids}
    family.update({d["image_id"]: d["copy_of"] for d in truth["duplicates"]})
    return rows, truth, ids, hashes, np.array([family[k] for k in ids])


def test_every_drawing_is_its_own_picture_to_a_perceptual_hash(synth_dir):
    from pzscale import imagehash

    rows, _, ids, hashes, family = _phashes_and_relatives(synth_dir)
    dist = imagehash.hamming(hashes[:, None], hashes[None, :])
    unrelated = np.triu(family[:, None] != family[None, :], 1)
    # forms drawn alike once made thousands of identical hashes (every bubble the same 32 x 32 picture)
    assert (dist[unrelated] == 0).sum() == 0
    assert (dist[unrelated] <= 8).mean() < 1e-4
    bubbles = np.array([rows[k]["original_label"] == "bubble" for k in ids]) & (family == np.array(ids))
    assert len(np.unique(hashes[bubbles])) == bubbles.sum() > 20


def test_near_copies_are_mild_and_shifts_only_small_on_large_images(synth_dir):
    from pzscale import imagehash

    rows, truth, ids, hashes, _ = _phashes_and_relatives(synth_dir)
    where = {k: i for i, k in enumerate(ids)}
    near = [d for d in truth["duplicates"] if d["kind"] == "near"]
    seen = set()
    for d in near:
        how = d["alteration"]
        seen.add(how.split()[0])
        if how.startswith("shift"):
            w, h = Image.open(io.BytesIO(rows[d["copy_of"]]["image"]["bytes"])).size
            dx, dy = (int(v) for v in how.split("(")[1].split(")")[0].split(","))
            assert min(w, h) >= 100 and 1 <= dx <= 0.02 * w and 1 <= dy <= 0.02 * h, (how, w, h)
        assert imagehash.hamming(hashes[where[d["image_id"]]], hashes[where[d["copy_of"]]]) <= 8, d
    assert {"rescale", "brightness", "re-encoded"} <= seen


def test_files_and_truth_are_the_same_for_any_number_of_workers(tmp_path):
    """Rows are planned by one generator and painted from per-row seeds: 2 processes write the same bytes as 1."""
    one, two = tmp_path / "one", tmp_path / "two"
    truth_one = synth(one, images=400, seed=5, rows_per_file=100, workers=1)
    truth_two = synth(two, images=400, seed=5, rows_per_file=100, workers=2)
    assert truth_one == truth_two and truth_one["duplicates"] and truth_one["corrupt"]
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and len(names) == 5
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    with pytest.raises(ValueError, match="workers"):
        synth(tmp_path / "bad", images=10, workers=0)


@pytest.mark.parametrize("shape", [(37, 91), (1, 1), (3, 500), (64, 48, 3), (1, 1, 3)])
def test_png_writer_decodes_to_the_same_pixels_with_pil(shape):
    from pzscale.images import encode_png as png
    from pzscale.synth import encode

    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    with Image.open(io.BytesIO(png(pixels))) as img:
        img.load()
        assert img.format == "PNG" and img.mode == ("L" if len(shape) == 2 else "RGB")
        assert np.array_equal(np.asarray(img), pixels)
    assert encode(Image.fromarray(pixels), "PNG") == png(pixels)  # the originals' PNGs are ours
    with Image.open(io.BytesIO(encode(Image.fromarray(pixels), "PNG", compress_level=9))) as img:
        assert np.array_equal(np.asarray(img), pixels)  # options: PIL's encoder
