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
