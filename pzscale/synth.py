"""Synthetic Planktonzilla-format parquet shards, with planted corrupt rows and duplicates.

The images are drawn, not copied: several morphologically distinct forms (diatom chains,
centric discs, spiny radiolarians, arrow worms, copepods, detritus, bubbles), each drawn with
random size, elongation, orientation and appendages, cropped to its bounding box with uneven
margins over a mottled, sloping background, so that no two are the same picture to a perceptual
hash; mostly greyscale PNG and JPEG, tens to hundreds of pixels. Exact and near duplicates
(re-encoded, rescaled, re-toned, or on large images shifted by at most 2%) are planted within
and across sources and listed with the corrupt rows in ``OUT/truth.json``.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from pzscale.images import encode_png
from pzscale.schema import PARQUET_COLUMNS

Render = Callable[[np.random.Generator], Image.Image]

# The renderers draw on a uniform "paper" of this grey; ``_place`` reads their pixels as transmission
# (value / PAPER) over the ROI's own uneven background, so blur, highlights and ink all carry over.
PAPER = 230
INK = (30, 120)  # the drawn forms' grey range on the paper
# How individual each ROI is (see ``_place``). More of each makes unrelated images lie further apart in pHash
# (planted near copies stay within 0-6 bits) but makes the forms harder for the built-in CNN of
# tests/test_ml_stages.py (macro-F1 0.93 here, 0.99 with none); internal texture costs it most.
TEXTURE, TEXTURE_SCALE = 0.15, (10, 20)  # blotch contrast inside bodies; blob size as 1/scale of the object
UNEVEN, UNEVEN_SCALE = 24, (12, 24)  # background mottling, grey levels (1 sd); blob size as 1/scale of the ROI
SLOPE = (0, 30)  # background gradient across the ROI, grey levels
MARGIN = (0.01, 0.1)  # padding of each side, as a fraction of the object's size along that axis
# The camera: a Gaussian blur of sigma 0.6 px as a 3 x 3 kernel (PIL's GaussianBlur is three box passes, 1.7x the
# time), then sensor noise, uniform over +-NOISE grey levels (sd 4.3; a normal draw costs 7x an integer one).
_TAPS = np.exp(-np.arange(-1, 2) ** 2 / (2 * 0.6**2))
OPTICS = ImageFilter.Kernel((3, 3), np.outer(_TAPS, _TAPS).ravel().tolist(), float(_TAPS.sum() ** 2))
NOISE = 7


def _canvas(w: float, h: float) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (max(int(w), 3), max(int(h), 3)), PAPER)
    return img, ImageDraw.Draw(img)


def _ink(rng: np.random.Generator) -> int:
    return int(rng.integers(*INK))


def _turned(img: Image.Image, rng: np.random.Generator, most: float = 180) -> Image.Image:
    # nearest-neighbour: 1/5 of the time of bilinear; the camera's blur (``OPTICS``) smooths the steps at the edges
    return img.rotate(float(rng.uniform(0, most)), resample=Image.Resampling.NEAREST, expand=True, fillcolor=PAPER)


def _chain(rng):
    cells, r = int(rng.integers(3, 9)), float(rng.uniform(5, 14))
    bend = float(rng.uniform(-0.12, 0.12)) * r  # chains curl: cell centres on a parabola
    sag = [bend * (i - (cells - 1) / 2) ** 2 for i in range(cells)]
    top = 6 + 3.2 * r + max(0.0, -min(sag))
    img, d = _canvas(cells * 2.2 * r + 12 + 4 * r, 8.4 * r + 14 + max(sag) - min(sag))
    ink = _ink(rng)
    for i in range(cells):
        cx, cy = 6 + r * (3.1 + 2.2 * i), top + sag[i]
        ry = r * rng.uniform(0.75, 1.1)
        d.ellipse([cx - r * rng.uniform(0.9, 1.1), cy - ry, cx + r, cy + ry], fill=ink)
        if i < cells - 1:
            d.line([cx, cy, cx + 2.2 * r, top + sag[i + 1]], fill=ink, width=2)
        for side in (-1, 1):  # setae: long spines from each cell, at random lengths and angles
            if rng.random() < 0.85:
                a, length = side * math.pi / 2 + rng.uniform(-0.6, 0.6), rng.uniform(1.5, 3) * r
                d.line([cx, cy, cx + length * math.cos(a), cy + length * math.sin(a)], fill=ink, width=1)
    return _turned(img, rng)


def _disc(rng):
    r = float(rng.uniform(12, 70))
    ry = r * float(rng.uniform(0.8, 1.0))  # a valve seen a little tilted
    img, d = _canvas(2 * r + 8, 2 * ry + 8)
    ink, cx, cy = _ink(rng), r + 4, ry + 4
    d.ellipse([cx - r, cy - ry, cx + r, cy + ry], fill=ink)
    ring = float(rng.uniform(0.6, 0.85))
    d.ellipse([cx - ring * r, cy - ring * ry, cx + ring * r, cy + ring * ry], outline=min(255, ink + 60), width=2)
    for a in rng.uniform(0, 2 * math.pi, int(rng.integers(12, 30))):  # striae at random angles
        d.line([cx, cy, cx + 0.75 * r * math.cos(a), cy + 0.75 * ry * math.sin(a)], fill=min(255, ink + 40))
    return _turned(img, rng)


def _spiny(rng):
    r, spine = float(rng.uniform(6, 20)), float(rng.uniform(15, 60))
    size = 2 * (r + 1.15 * spine) + 6
    img, d = _canvas(size, size)
    ink, c = _ink(rng), size / 2
    for a in np.linspace(0, 2 * math.pi, int(rng.integers(10, 24)), endpoint=False):
        a += rng.uniform(-0.15, 0.15)
        reach = r + spine * rng.uniform(0.6, 1.15)  # spines of uneven length
        d.line([c, c, c + reach * math.cos(a), c + reach * math.sin(a)], fill=ink, width=int(rng.integers(2, 4)))
    ry = r * rng.uniform(0.8, 1.0)
    d.ellipse([c - r, c - ry, c + r, c + ry], fill=ink)
    return _turned(img, rng, 360)


def _arrow_worm(rng):
    length, width = float(rng.uniform(60, 300)), float(rng.uniform(5, 14))
    img, d = _canvas(length + 10, width * 3 + 10)
    ink, mid = _ink(rng), (width * 3 + 10) / 2
    d.ellipse([5, mid - width / 2, 5 + length, mid + width / 2], fill=ink)
    fin = rng.uniform(0.8, 0.9)
    d.polygon([(5 + length * fin, mid), (5 + length, mid - width * rng.uniform(1.0, 1.5)),
               (5 + length, mid + width * rng.uniform(1.0, 1.5))], fill=ink)  # tail fin
    if rng.random() < 0.7:  # lateral fins
        x = 5 + length * rng.uniform(0.45, 0.7)
        d.polygon([(x, mid), (x + length * 0.12, mid - width * 1.1), (x + length * 0.2, mid)], fill=ink)
    head = width * rng.uniform(1.4, 2.2)
    d.ellipse([2, mid - head * 0.45, 2 + head, mid + head * 0.45], fill=ink)  # head
    return _turned(img, rng)


def _copepod(rng):
    body = float(rng.uniform(25, 90))
    img, d = _canvas(body * 2.2, body * 1.6)
    ink = _ink(rng)
    x0, y0 = body * 0.6, body * 0.55
    depth, tail = body * rng.uniform(0.35, 0.55), body * rng.uniform(0.35, 0.6)
    d.ellipse([x0, y0, x0 + body, y0 + depth], fill=ink)  # prosome
    d.rectangle([x0 + body, y0 + depth * 0.38, x0 + body + tail, y0 + depth * 0.62], fill=ink)  # urosome
    reach = body * rng.uniform(0.35, 0.6)
    for s in (-1, 1):  # antennules
        d.line([x0 + 4, y0 + depth * 0.45, x0 - reach, y0 + depth * 0.45 + s * reach * rng.uniform(0.7, 1.1)],
               fill=ink, width=2)
    for k in range(int(rng.integers(0, 5))):  # swimming legs
        x = x0 + body * (0.3 + 0.12 * k)
        d.line([x, y0 + depth * 0.8, x - body * 0.1, y0 + depth + body * rng.uniform(0.1, 0.3)], fill=ink, width=1)
    return _turned(img, rng, 360)


def _detritus(rng):
    size = float(rng.uniform(20, 160))
    img, d = _canvas(size, size * rng.uniform(0.6, 1.2))
    ink = _ink(rng)
    for _ in range(int(rng.integers(4, 12))):
        x, y = rng.uniform(0.2, 0.8) * img.width, rng.uniform(0.2, 0.8) * img.height
        rx, ry = rng.uniform(0.05, 0.3) * size, rng.uniform(0.05, 0.3) * size
        d.ellipse([x - rx, y - ry, x + rx, y + ry], fill=int(ink + rng.integers(0, 60)))
    return img.filter(ImageFilter.GaussianBlur(1.5))


def _bubble(rng):
    r = float(rng.uniform(8, 50))
    ry = r * float(rng.uniform(0.85, 1.0))
    img, d = _canvas(2 * r + 8, 2 * ry + 8)
    cx, cy = r + 4, ry + 4
    d.ellipse([cx - r, cy - ry, cx + r, cy + ry], outline=_ink(rng), width=max(2, int(r / rng.uniform(4, 8))))
    a, off, spot = rng.uniform(0, 2 * math.pi), rng.uniform(0.2, 0.5) * r, rng.uniform(0.15, 0.3) * r
    hx, hy = cx + off * math.cos(a), cy + off * math.sin(a)
    d.ellipse([hx - spot, hy - spot, hx + spot, hy + spot], fill=250)  # highlight, brighter than the paper
    return _turned(img, rng)


def _low_frequency(h: int, w: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth random field (h, w) of about unit variance with blobs about 1/scale of the larger side: white noise
    on a coarse grid of ``scale / 2`` cells along that side, upsampled bicubically (20x cheaper than blurring
    full-size noise with a Gaussian of sigma ``size / scale``, which gives blobs of the same size)."""
    cell = max(h, w) / max(2.0, scale / 2)
    gh, gw = math.ceil(h / cell) + 2, math.ceil(w / cell) + 2
    coarse = rng.standard_normal((gh, gw), dtype=np.float32)
    # standardised on the grid; bicubic upsampling of white noise keeps ~0.62 of its variance
    flat = coarse.ravel()
    centred = flat - flat.sum() / flat.size  # as .mean() and .std(), with fewer numpy calls on ~100 values
    coarse = (centred * np.float32(1 / (0.79 * (math.sqrt(centred @ centred / flat.size) + 1e-6)))).reshape(gh, gw)
    # one cell of margin on every side: the field near the edges is as smooth as inside
    box = (1.0, 1.0, 1.0 + w / cell, 1.0 + h / cell)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC, box=box))


# A drawing's object: pixels at least this many grey levels off the paper (transmission off 1 by more than 2%).
_OBJECT = math.floor(0.02 * PAPER) + 1
_TRANSMISSION = np.arange(256, dtype=np.float32) / PAPER


def _place(drawn: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Put a drawn object in an ROI as a camera would: its own texture, uneven margins, uneven background.

    Two drawings of one form then differ at the 32 x 32 low-frequency level a perceptual hash sees, as real
    ROIs do; thin elongated forms at similar angles can still come within 8 pHash bits of each other.
    """
    # segmentation: the object's bounding box (as PIL images: numpy's per-pixel lookups take twice the time)
    box = ImageChops.subtract(ImageChops.difference(drawn, Image.new("L", drawn.size, PAPER)),
                              Image.new("L", drawn.size, _OBJECT - 1)).getbbox()
    grey = np.asarray(drawn.crop(box) if box else drawn)
    transmission = _TRANSMISSION[grey]
    h, w = transmission.shape
    # blotches: how dark the body is varies smoothly inside it, differently in every image
    texture = 1 + TEXTURE * _low_frequency(h, w, rng.uniform(*TEXTURE_SCALE), rng)
    transmission = 1 - (1 - transmission) * np.clip(texture, 0.3, 1.8)
    # crops are padded unevenly around the object
    left, right = (int(rng.uniform(*MARGIN) * w) + 2 for _ in range(2))
    top, bottom = (int(rng.uniform(*MARGIN) * h) + 2 for _ in range(2))
    roi = np.ones((h + top + bottom, w + left + right), np.float32)
    roi[top : top + h, left : left + w] = transmission
    rows, cols = roi.shape
    angle, slope = rng.uniform(0, 2 * math.pi), rng.uniform(*SLOPE)
    xx, yy = np.arange(cols, dtype=np.float32) / cols - 0.5, np.arange(rows, dtype=np.float32)[:, None] / rows - 0.5
    background = UNEVEN * _low_frequency(rows, cols, rng.uniform(*UNEVEN_SCALE), rng)
    background += np.float32(rng.uniform(195, 236)) + (np.float32(slope * math.cos(angle)) * xx
                                                       + np.float32(slope * math.sin(angle)) * yy)
    background *= roi
    return Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))


# (renderer, Planktonzilla taxonomy row: ranks, proposed_label, plankton, root_class, ids)
TAXA: dict[str, tuple[Render, dict]] = {
    "Chaetoceros": (_chain, dict(
        ranks=["chromista", "heterokontophyta", "bacillariophyceae", "chaetocerotanae",
               "chaetocerotaceae", "chaetoceros", None],
        proposed_label="chaetoceros", plankton=True, root_class="living", qualifier="full_body",
        wikidata_ID="Q1761179", aphia_ID="148985.0", NCBI_ID="49237.0", BOLD_ID="87566.0",
        ecotaxa_ID="540;734;754;760")),
    "Coscinodiscus": (_disc, dict(
        ranks=["chromista", "heterokontophyta", "bacillariophyceae", "coscinodiscales",
               "coscinodiscaceae", "coscinodiscus", None],
        proposed_label="coscinodiscus", plankton=True, root_class="living", qualifier="full_body",
        wikidata_ID="Q12744975", aphia_ID="148917.0", NCBI_ID="33641.0", BOLD_ID="74449.0",
        ecotaxa_ID="202")),
    "Acantharea": (_spiny, dict(
        ranks=["chromista", "radiozoa", "acantharia", None, None, None, None],
        proposed_label="acantharia", plankton=True, root_class="living", qualifier="full_body",
        wikidata_ID="Q135584", aphia_ID="586732.0", NCBI_ID="65574.0", BOLD_ID="714957.0",
        ecotaxa_ID="625;640")),
    "Chaetognatha": (_arrow_worm, dict(
        ranks=["animalia", "chaetognatha", None, None, None, None, None],
        proposed_label="chaetognatha", plankton=True, root_class="living", qualifier="full_body",
        wikidata_ID="Q192416", aphia_ID="2081.0", NCBI_ID="10229.0", BOLD_ID="13.0", ecotaxa_ID="115")),
    "Calanoida": (_copepod, dict(
        ranks=["animalia", "arthropoda", "copepoda", "calanoida", None, None, None],
        proposed_label="calanoida", plankton=True, root_class="living", qualifier="full_body",
        wikidata_ID="Q478553", aphia_ID="1100.0", NCBI_ID="6833.0", BOLD_ID="386.0",
        ecotaxa_ID="114;320;564")),
    "detritus": (_detritus, dict(
        ranks=[None] * 7, proposed_label="detritus", plankton=False, root_class="detritus",
        qualifier=None, ecotaxa_ID="207;666;717")),
    "bubble": (_bubble, dict(
        ranks=[None] * 7, proposed_label="bubble", plankton=False, root_class="artefact",
        qualifier=None, ecotaxa_ID="205;667;715")),
}

# source -> (image format, colour fraction, has position/time, depth kind, region lat/lon box)
SOURCES = {
    "synth_ifcb": ("PNG", 0.0, True, "point", (41.0, 41.5, -70.8, -70.3)),
    "synth_uvp5": ("JPEG", 0.0, True, "range", (-40.0, 40.0, -170.0, 170.0)),
    "synth_zooscan": ("JPEG", 0.0, True, "range", (43.0, 44.0, 7.0, 8.0)),
    "synth_planktoscope": ("PNG", 0.3, False, None, None),
}


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    """``img`` as ``fmt`` bytes: a PNG without options by ``encode_png`` (3-4x faster), anything else by PIL."""
    if fmt == "PNG" and not kwargs and img.mode in ("L", "RGB"):
        return encode_png(np.asarray(img))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _finish(img: Image.Image, rng: np.random.Generator, colour: bool) -> Image.Image:
    arr = np.asarray(img.filter(OPTICS), dtype=np.int16)
    arr = np.clip(arr + rng.integers(-NOISE, NOISE + 1, arr.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    out = Image.fromarray(arr)
    if colour:  # dark-field colour camera: tint the greyscale image
        tint = rng.uniform(0.7, 1.0, 3).astype(np.float32)
        out = Image.fromarray((np.asarray(out.convert("RGB")) * tint).astype(np.uint8))
    return out


def _near_copy(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A copy a near-duplicate search should catch: rescaled, re-toned, or (large images only) shifted a little.

    A shift of a few pixels is a small change only on an image of a hundred pixels or more: it is at most 2% of
    each side, so that a 30-pixel ROI is never moved by a tenth of itself.
    """
    kinds = ["rescale", "tone", "jpeg"] + (["shift"] if min(img.size) >= 100 else [])
    kind = kinds[int(rng.integers(0, len(kinds)))]
    if kind == "shift":  # the camera's crop box a little further right and down: crop at the top-left
        dx, dy = (int(rng.integers(1, int(0.02 * side) + 1)) for side in img.size)
        return img.crop((dx, dy, img.width, img.height)), f"shift by ({dx}, {dy}) px (cropped at the top left)"
    if kind == "rescale":
        f = round(float(rng.choice([-1, 1]) * rng.uniform(0.03, 0.1) + 1), 2)
        size = (max(3, round(img.width * f)), max(3, round(img.height * f)))
        return img.resize(size, Image.Resampling.BILINEAR), f"rescale x{f}"
    if kind == "tone":
        gain, offset = float(rng.uniform(0.85, 1.15)), float(rng.uniform(-12, 12))
        arr = np.asarray(img, np.float32)
        toned = np.clip((arr - arr.mean()) * gain + arr.mean() + offset, 0, 255).astype(np.uint8)
        return Image.fromarray(toned), f"brightness {offset:+.0f}, contrast x{gain:.2f}"
    return img, "re-encoded as JPEG quality 70"


def _draw(label: str, rng: np.random.Generator, colour: bool) -> Image.Image:
    return _finish(_place(TAXA[label][0](rng), rng), rng, colour)


# Below this many images a pool of processes costs more to start (each imports numpy, PIL, pyarrow) than it saves.
PARALLEL_MIN_IMAGES = 5000
EXACT_SAME_BYTES, EXACT_PNG, NEAR = "identical bytes", "same pixels re-encoded as PNG", "near"


def synth(out: str | Path, *, images: int = 2000, seed: int = 0, rows_per_file: int = 1000,
          row_group_size: int = 256, source_taxa: dict[str, list[str]] | None = None,
          workers: int | None = None) -> dict:
    """Write ``images`` rows as Planktonzilla parquet shards under ``out``; return the truth.

    ``source_taxa`` (source -> TAXA names) limits each listed source to those taxa and uses only the
    listed sources, so that some classes exist only in some sources (held-out sources with unseen
    classes); duplicates are then planted only in sources that have their taxon. Default: every
    source draws every taxon.

    One generator seeded with ``seed`` plans every row (source, taxon, which rows are copies of which, corrupt
    rows, the order); each row's pixels and metadata come from a generator seeded with ``(seed, row)``, so files
    are painted independently, by ``workers`` processes (default: one per CPU from ``PARALLEL_MIN_IMAGES`` images
    up), and are the same bytes for any number of them. A script calling this with several workers needs the
    ``if __name__ == "__main__":`` guard of ``multiprocessing``'s spawn start method.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan_rows(images, seed, source_taxa)
    n_files = max(1, math.ceil(images / rows_per_file))
    files = [(out / f"train-{f:05d}-of-{n_files:05d}.parquet",
              plan["order"][f * rows_per_file : (f + 1) * rows_per_file]) for f in range(n_files)]
    truth: dict = {"seed": seed, "images": images, "duplicates": [], "corrupt": []}
    found: list[tuple] = []
    for part in _map(_paint_file, files, plan, row_group_size, _workers(workers, images)):
        found.extend(part)
    for _, kind, entry in sorted(found, key=lambda x: (x[1] == "corrupt", x[0])):
        truth["corrupt" if kind == "corrupt" else "duplicates"].append(entry)
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def _plan_rows(images: int, seed: int, source_taxa: dict[str, list[str]] | None) -> dict:
    """What every row is (by row number, the number in its id): source, taxon, colour, and for copies and corrupt
    rows the original they come from; and the order rows are written in. Small arrays, drawn in one process."""
    rng = np.random.default_rng(seed)
    names, sources = list(TAXA), list(SOURCES)
    weights = np.array([0.2, 0.15, 0.1, 0.1, 0.15, 0.2, 0.1])
    if source_taxa is not None:
        taxa = {t for listed in source_taxa.values() for t in listed}
        unknown = sorted({*source_taxa} - set(SOURCES)) + sorted(taxa - set(TAXA))
        if unknown or not all(source_taxa.values()):
            raise ValueError(f"source_taxa: unknown sources or taxa {unknown}, or a source without taxa")
        sources = list(source_taxa)
    n_corrupt = max(2, images // 200)
    n_dups = max(4, images // 25)
    n_orig = images - n_corrupt - n_dups
    if n_orig < 1:
        raise ValueError(f"synth: {images} images leave no room for originals besides the planted copies")
    taxon_p = np.array([weights if source_taxa is None else
                        _renormalised(weights * np.isin(names, source_taxa[s])) for s in sources])
    source = rng.integers(0, len(sources), n_orig)
    label = (rng.random(n_orig)[:, None] > np.cumsum(taxon_p, axis=1)[source]).sum(axis=1)
    label = np.minimum(label, len(names) - 1)  # rounding of the cumulative sum
    colour = rng.random(n_orig) < np.array([SOURCES[s][1] for s in sources])[source]
    copy_of = rng.integers(0, n_orig, n_dups)
    dup_source = np.empty(n_dups, np.int64)
    for j, k in enumerate(copy_of):  # often another source: any that has the taxon
        ok = [i for i, s in enumerate(sources) if source_taxa is None or names[label[k]] in source_taxa[s]]
        dup_source[j] = ok[int(rng.integers(0, len(ok)))]
    base = rng.integers(0, n_orig, n_corrupt)
    return {
        "seed": seed, "names": names, "sources": sources, "n_orig": n_orig, "n_dups": n_dups,
        "source": np.r_[source, dup_source, np.arange(n_corrupt) % len(sources)],
        "label": np.r_[label, label[copy_of], np.full(n_corrupt, names.index("detritus"))],
        "colour": np.r_[colour, np.zeros(n_dups + n_corrupt, bool)],
        "ref": np.r_[np.arange(n_orig), copy_of, base],  # the original a row is, copies, or is corrupted from
        "order": rng.permutation(images),  # copies and corrupt rows land anywhere
    }


def _original(plan: dict, n: int) -> tuple[bytes, Image.Image, np.random.Generator]:
    """Original row ``n``: its encoded bytes, the image drawn and its generator (after the drawing)."""
    rng = np.random.default_rng([plan["seed"], n])
    label, source, colour = plan["names"][plan["label"][n]], plan["sources"][plan["source"][n]], plan["colour"][n]
    fmt = SOURCES[source][0]
    img = _draw(label, rng, colour)
    return encode(img, fmt, **({"quality": 90} if fmt == "JPEG" else {})), img, rng


def _paint_file(path: Path, rows: np.ndarray, plan: dict, row_group_size: int) -> list[tuple]:
    """Paint and write one parquet file of rows ``rows`` (in order); return its truth entries."""
    n_orig, n_dups = plan["n_orig"], plan["n_dups"]
    out, found = [], []
    for n in rows.tolist():
        ref = int(plan["ref"][n])
        data, drawn, rng = _original(plan, ref)
        if n < n_orig:
            out.append(_row(n, plan["sources"][plan["source"][n]], plan["names"][plan["label"][n]], data, rng))
            continue
        rng = np.random.default_rng([plan["seed"], n])
        source, label = plan["sources"][plan["source"][n]], plan["names"][plan["label"][n]]
        orig_id = f"{plan['sources'][plan['source'][ref]]}:{ref:08d}"
        if n < n_orig + n_dups:
            j = n - n_orig
            pixels = Image.open(io.BytesIO(data)).convert(drawn.mode)  # what a reader of the original decodes
            if j % 2 == 0:  # exact: same pixels, maybe other bytes
                how = EXACT_SAME_BYTES if j % 4 == 0 else EXACT_PNG
                if how == EXACT_PNG:
                    data = encode(pixels, "PNG", compress_level=9)
                kind = "exact"
            else:
                img, how = _near_copy(pixels, rng)
                data, kind = encode(img.convert("L") if img.mode == "L" else img, "JPEG", quality=70), "near"
                if how != "re-encoded as JPEG quality 70":
                    how += ", JPEG quality 70"
            row = _row(n, source, label, data, rng)
            found.append((j, "dup", {"image_id": row["_id"], "copy_of": orig_id, "kind": kind, "alteration": how}))
        else:
            j = n - n_orig - n_dups
            data, how = ((data[: len(data) // 2], "truncated to half its bytes") if j % 2 == 0
                         else (rng.bytes(200), "random bytes"))
            row = _row(n, source, label, data, rng)
            found.append((j, "corrupt", {"image_id": row["_id"], "problem": how}))
        out.append(row)
    _write_parquet(out, path, row_group_size)
    return found


def _workers(workers: int | None, images: int) -> int:
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if multiprocessing.current_process().daemon:  # e.g. in a Dask worker process: no children allowed
        return 1
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return cpus if images >= PARALLEL_MIN_IMAGES else 1
    return workers


def _map(fn: Callable, items: list[tuple], plan: dict, row_group_size: int, workers: int) -> Iterator:
    """``fn(*item, plan, row_group_size)`` for every item, in order: here, or on a spawned pool of ``workers``
    that each receive the plan once (per task it would be pickled again: 33 MB for a million images)."""
    if workers == 1 or len(items) == 1:
        for item in items:
            yield fn(*item, plan, row_group_size)
        return
    with ProcessPoolExecutor(min(workers, len(items)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_receive_plan, initargs=(plan,)) as pool:
        futures = deque()
        for item in items:  # a bounded queue: memory does not grow with the number of files
            futures.append(pool.submit(_with_plan, fn, *item, row_group_size))
            if len(futures) >= 4 * workers:
                yield futures.popleft().result()
        while futures:
            yield futures.popleft().result()


_PLAN: dict = {}  # a pool process's copy of the plan


def _receive_plan(plan: dict) -> None:
    _PLAN.update(plan)


def _with_plan(fn: Callable, *args):
    return fn(*args[:-1], _PLAN, args[-1])


def _renormalised(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum()


def _row(n: int, source: str, label: str, data: bytes, rng: np.random.Generator) -> dict:
    fmt, _, located, depth_kind, box = SOURCES[source]
    tax = TAXA[label][1]
    obj_id = f"{n:08d}"
    ext = "png" if fmt == "PNG" else "jpg"
    row = {
        "_id": f"{source}:{obj_id}", "_bytes": data,
        "image": {"bytes": data, "path": f"{obj_id}.{ext}"},
        "dataset": source, "original_label": label, "original_path": f"/{label}/{obj_id}.{ext}",
        **dict(zip(["Kingdom", "Phylum", "Class", "Order", "Family", "Genus", "Species"], tax["ranks"],
                   strict=True)),
        "proposed_label": tax["proposed_label"], "plankton": tax["plankton"],
        "root_class": tax["root_class"], "qualifier": tax.get("qualifier"),
        "wikidata_ID": tax.get("wikidata_ID"), "ecotaxa_ID": tax.get("ecotaxa_ID"),
        "aphia_ID": tax.get("aphia_ID"), "NCBI_ID": tax.get("NCBI_ID"), "BOLD_ID": tax.get("BOLD_ID"),
        "Latitude": None, "Longitude": None, "Depth_min": None, "Depth_max": None,
        "Humidity": None, "Temperature": None, "ObjID": obj_id, "timestamp": None,
        "license": "cc-by-4.0", "license_url": "https://creativecommons.org/licenses/by/4.0/",
    }
    if located:
        lat0, lat1, lon0, lon1 = box
        row["Latitude"], row["Longitude"] = float(rng.uniform(lat0, lat1)), float(rng.uniform(lon0, lon1))
        day = np.datetime64("2019-01-01T00:00:00") + np.timedelta64(int(rng.integers(0, 4 * 365 * 86400)), "s")
        row["timestamp"] = str(day) + "Z"
        top = float(rng.uniform(0, 200))
        row["Depth_min"], row["Depth_max"] = (top, top) if depth_kind == "point" else (top, top + 50)
    if source == "synth_ifcb":  # housing sensors, as WHOI's IFCB headers
        row["Temperature"], row["Humidity"] = float(rng.uniform(18, 25)), float(rng.uniform(30, 60))
    return row


def _write_parquet(rows: list[dict], path: Path, row_group_size: int) -> None:
    columns = {c: [r[c] for r in rows] for c in PARQUET_COLUMNS if c != "image"}
    image = pa.StructArray.from_arrays([pa.array([r["image"]["bytes"] for r in rows], pa.binary()),
                                        pa.array([r["image"]["path"] for r in rows], pa.string())], ["bytes", "path"])
    table = pa.Table.from_pydict({"image": image, **columns}, schema=PARQUET_SCHEMA)
    # no min/max statistics of the image bytes: costly to compute and of no use to a reader
    pq.write_table(table, path, row_group_size=row_group_size,
                   write_statistics=[c for c in PARQUET_COLUMNS if c != "image"])


PARQUET_SCHEMA = pa.schema(
    [pa.field("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))]
    + [pa.field(c, pa.bool_() if c == "plankton" else
                pa.float32() if c in ("Latitude", "Longitude", "Depth_min", "Depth_max", "Humidity", "Temperature")
                else pa.string())
       for c in PARQUET_COLUMNS if c != "image"],
    metadata={"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}})},
)


# ---------------------------------------------------------------- IFCB raw bins

ADC_V2_COLUMNS = ("trigger#, ADCtime, PMTA, PMTB, PMTC, PMTD, PeakA, PeakB, PeakC, PeakD, TimeOfFlight, "
                  "GrabTimeStart, GrabTimeEnd, RoiX, RoiY, RoiWidth, RoiHeight, StartByte, ComparatorOut, "
                  "StartPoint, SignalLength, Status, RunTime, InhibitTime")


def synth_ifcb(out: str | Path, *, images: int = 1000, seed: int = 0, rois_per_bin: int = 400,
               instrument: int = 999) -> dict:
    """Write IFCB schema-v2 raw bins (``.hdr``/``.adc``/``.roi``) under ``out/D<YYYY>/D<YYYYMMDD>/``.

    Every fourth trigger has no image (width = height = 0), as real bins do; ROI pixels are
    raw 8-bit greyscale written back to back at the ADC's StartByte. Returns (and writes to
    ``out/truth.json``) each bin's ROI count, run/inhibit times and position.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    names = [n for n in TAXA if n != "bubble"]
    truth: dict = {"seed": seed, "bins": []}
    start = np.datetime64("2024-06-01T00:00:00")
    made = 0
    while made < images:
        n = min(rois_per_bin, images - made)
        when = start + np.timedelta64(int(rng.integers(0, 90 * 86400)), "s")
        stamp = str(when).replace("-", "").replace(":", "")
        lid = f"D{stamp}_IFCB{instrument:03d}"
        folder = out / f"D{stamp[:4]}" / f"D{stamp[:8]}"
        folder.mkdir(parents=True, exist_ok=True)
        roi, lines, offset, trigger = bytearray(), [], 0, 0
        run_time = float(rng.uniform(1100, 1250))
        inhibit = float(rng.uniform(0.5, 15))
        for k in range(n):
            if k % 3 == 2:  # a trigger without an image carries the next StartByte
                trigger += 1
                lines.append(_adc_line(trigger, 0, 0, offset, run_time, inhibit, rng))
            pixels = np.asarray(_draw(names[int(rng.integers(0, len(names)))], rng, False))
            h, w = pixels.shape
            trigger += 1
            lines.append(_adc_line(trigger, w, h, offset, run_time, inhibit, rng))
            roi += pixels.tobytes()
            offset += w * h
        lat, lon = float(rng.uniform(41.2, 41.4)), float(rng.uniform(-70.6, -70.5))
        header = [
            "softwareVersion: Imaging FlowCytobot Acquisition Software version 3.0 (pzscale synth)",
            f"runTime: {run_time:.6f}", f"inhibitTime: {inhibit:.6f}", "SyringeSampleVolume: 5",
            f"triggerCount: {trigger}", f"roiCount: {n}", f"gpsLatitude: {lat:.8f}", f"gpsLongitude: {lon:.8f}",
            f"ADCFileFormat: {ADC_V2_COLUMNS}",
        ]
        (folder / f"{lid}.hdr").write_text("\r\n".join(header) + "\r\n")
        (folder / f"{lid}.adc").write_text("\r\n".join(lines) + "\r\n")
        (folder / f"{lid}.roi").write_bytes(bytes(roi))
        truth["bins"].append({"bin": lid, "rois": n, "triggers": trigger, "runTime": run_time,
                              "inhibitTime": inhibit, "ml_analyzed": 0.25 * (run_time - inhibit) / 60,
                              "lat": lat, "lon": lon})
        made += n
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def _adc_line(trigger: int, w: int, h: int, start: int, run_time: float, inhibit: float,
              rng: np.random.Generator) -> str:
    t = trigger * 0.5
    values = [trigger, t, *rng.uniform(0, 0.2, 8).round(6), -999.0, t + 0.01, t + 0.02,
              int(rng.integers(0, 1300)) if w else 0, int(rng.integers(0, 1000)) if w else 0, w, h, start,
              0, 0, 0, 0, run_time, inhibit]
    return ",".join(f"{v:.6f}" if isinstance(v, float) else str(v) for v in values)
