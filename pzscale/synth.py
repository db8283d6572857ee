"""Synthetic Planktonzilla-format parquet shards, with planted corrupt rows and duplicates.

The images are drawn, not copied: several morphologically distinct forms (diatom chains,
centric discs, spiny radiolarians, arrow worms, copepods, detritus, bubbles), mostly
greyscale PNG and JPEG, tens to hundreds of pixels. Exact and near duplicates are planted
within and across sources and listed with the corrupt rows in ``OUT/truth.json``.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

from pzscale.schema import PARQUET_COLUMNS

Render = Callable[[np.random.Generator], Image.Image]


def _canvas(w: int, h: int, rng: np.random.Generator) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (max(w, 3), max(h, 3)), int(rng.integers(200, 236)))
    return img, ImageDraw.Draw(img)


def _ink(rng: np.random.Generator) -> int:
    return int(rng.integers(30, 120))


def _chain(rng):
    cells, r = int(rng.integers(3, 9)), float(rng.uniform(5, 14))
    img, d = _canvas(int(cells * 2.2 * r + 10), int(2.6 * r + 10), rng)
    ink = _ink(rng)
    for i in range(cells):
        cx = 5 + r * (1.1 + 2.2 * i)
        d.ellipse([cx - r, 5, cx + r, 5 + 2 * r * rng.uniform(0.9, 1.2)], fill=ink)
        d.line([cx, 5 + r, cx + 2.2 * r, 5 + r], fill=ink, width=2)
        d.line([cx, 5, cx + rng.uniform(-r, r), 0], fill=ink, width=1)  # setae
    return img.rotate(float(rng.uniform(0, 180)), expand=True, fillcolor=int(img.getpixel((0, 0))))


def _disc(rng):
    r = float(rng.uniform(12, 70))
    size = int(2 * r + 8)
    img, d = _canvas(size, size, rng)
    ink = _ink(rng)
    c = size / 2
    d.ellipse([c - r, c - r, c + r, c + r], fill=ink)
    d.ellipse([c - 0.8 * r, c - 0.8 * r, c + 0.8 * r, c + 0.8 * r], outline=min(255, ink + 60), width=2)
    for a in np.linspace(0, 2 * math.pi, int(rng.integers(12, 30)), endpoint=False):
        d.line([c, c, c + 0.75 * r * math.cos(a), c + 0.75 * r * math.sin(a)], fill=min(255, ink + 40))
    return img


def _spiny(rng):
    r, spine = float(rng.uniform(6, 20)), float(rng.uniform(15, 60))
    size = int(2 * (r + spine) + 6)
    img, d = _canvas(size, size, rng)
    ink, c = _ink(rng), size / 2
    for a in np.linspace(0, 2 * math.pi, int(rng.integers(10, 24)), endpoint=False):
        a += rng.uniform(-0.1, 0.1)
        d.line([c, c, c + (r + spine) * math.cos(a), c + (r + spine) * math.sin(a)], fill=ink, width=2)
    d.ellipse([c - r, c - r, c + r, c + r], fill=ink)
    return img


def _arrow_worm(rng):
    length, width = float(rng.uniform(60, 300)), float(rng.uniform(5, 14))
    img, d = _canvas(int(length + 10), int(width * 3 + 10), rng)
    ink, mid = _ink(rng), (width * 3 + 10) / 2
    d.ellipse([5, mid - width / 2, 5 + length, mid + width / 2], fill=ink)
    d.polygon([(5 + length * 0.85, mid), (5 + length, mid - width * 1.4), (5 + length, mid + width * 1.4)],
              fill=ink)  # tail fin
    d.ellipse([2, mid - width * 0.8, 2 + width * 1.8, mid + width * 0.8], fill=ink)  # head
    return img.rotate(float(rng.uniform(0, 180)), expand=True, fillcolor=int(img.getpixel((0, 0))))


def _copepod(rng):
    body = float(rng.uniform(25, 90))
    img, d = _canvas(int(body * 2.2), int(body * 1.6), rng)
    ink = _ink(rng)
    x0, y0 = body * 0.6, body * 0.55
    d.ellipse([x0, y0, x0 + body, y0 + body * 0.45], fill=ink)  # prosome
    d.rectangle([x0 + body, y0 + body * 0.17, x0 + body * 1.5, y0 + body * 0.28], fill=ink)  # urosome
    for s in (-1, 1):  # antennules
        d.line([x0 + 4, y0 + body * 0.2, x0 - body * 0.55, y0 + body * 0.2 + s * body * 0.5], fill=ink, width=2)
    return img.rotate(float(rng.uniform(0, 360)), expand=True, fillcolor=int(img.getpixel((0, 0))))


def _detritus(rng):
    size = int(rng.uniform(20, 160))
    img, d = _canvas(size, int(size * rng.uniform(0.6, 1.2)), rng)
    ink = _ink(rng)
    for _ in range(int(rng.integers(4, 12))):
        x, y = rng.uniform(0.2, 0.8) * img.width, rng.uniform(0.2, 0.8) * img.height
        rx, ry = rng.uniform(0.05, 0.3) * size, rng.uniform(0.05, 0.3) * size
        d.ellipse([x - rx, y - ry, x + rx, y + ry], fill=int(ink + rng.integers(0, 60)))
    return img.filter(ImageFilter.GaussianBlur(1.5))


def _bubble(rng):
    r = float(rng.uniform(8, 50))
    size = int(2 * r + 8)
    img, d = _canvas(size, size, rng)
    c = size / 2
    d.ellipse([c - r, c - r, c + r, c + r], outline=_ink(rng), width=max(2, int(r / 6)))
    d.ellipse([c - r * 0.5, c - r * 0.6, c - r * 0.1, c - r * 0.2], fill=250)  # highlight
    return img


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
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _finish(img: Image.Image, rng: np.random.Generator, colour: bool) -> Image.Image:
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float32)
    arr = np.clip(arr + rng.normal(0, 4, arr.shape), 0, 255).astype(np.uint8)
    out = Image.fromarray(arr)
    if colour:  # dark-field colour camera: tint the greyscale image
        tint = rng.uniform(0.7, 1.0, 3)
        out = Image.fromarray((np.asarray(out.convert("RGB")) * tint).astype(np.uint8))
    return out


def _near_copy(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
    kind = ["shift", "rescale", "jpeg"][int(rng.integers(0, 3))]
    if kind == "shift":
        dx, dy = (int(v) for v in rng.integers(1, 4, 2))
        fill = int(np.asarray(img.convert("L"))[0, 0])
        moved = Image.new(img.mode, img.size, fill if img.mode == "L" else (fill,) * 3)
        moved.paste(img.crop((dx, dy, img.width, img.height)), (0, 0))
        return moved, f"shift by ({dx}, {dy}) px"
    if kind == "rescale":
        f = float(rng.choice([0.9, 0.95, 1.05, 1.1]))
        size = (max(3, round(img.width * f)), max(3, round(img.height * f)))
        return img.resize(size, Image.Resampling.BILINEAR), f"rescale x{f}"
    return img, "re-encoded as JPEG quality 70"


def synth(out: str | Path, *, images: int = 2000, seed: int = 0, rows_per_file: int = 1000,
          row_group_size: int = 256) -> dict:
    """Write ``images`` rows as Planktonzilla parquet shards under ``out``; return the truth."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names, sources = list(TAXA), list(SOURCES)
    rows: list[dict] = []
    pixels: list[Image.Image] = []  # decoded originals, for planting copies
    truth: dict = {"seed": seed, "images": images, "duplicates": [], "corrupt": []}
    n_corrupt = max(2, images // 200)
    n_dups = max(4, images // 25)
    n_orig = images - n_corrupt - n_dups
    for i in range(n_orig):
        source = sources[int(rng.integers(0, len(sources)))]
        label = names[int(rng.choice(len(names), p=[0.2, 0.15, 0.1, 0.1, 0.15, 0.2, 0.1]))]
        fmt, colour_frac, *_ = SOURCES[source]
        img = _finish(TAXA[label][0](rng), rng, colour=rng.random() < colour_frac)
        data = encode(img, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        pixels.append(Image.open(io.BytesIO(data)).convert(img.mode))
        rows.append(_row(i, source, label, data, rng))
    for j in range(n_dups):
        k = int(rng.integers(0, n_orig))
        orig = rows[k]
        source = sources[int(rng.integers(0, len(sources)))]  # often another source
        if j % 2 == 0:  # exact: same pixels, maybe other bytes
            if j % 4 == 0:
                data, how = orig["_bytes"], "identical bytes"
            else:
                data, how = encode(pixels[k], "PNG", compress_level=9), "same pixels re-encoded as PNG"
            kind = "exact"
        else:
            img, how = _near_copy(pixels[k], rng)
            data, kind = encode(img.convert("L") if img.mode == "L" else img, "JPEG", quality=70), "near"
            if how != "re-encoded as JPEG quality 70":
                how += ", JPEG quality 70"
        row = _row(n_orig + j, source, orig["original_label"], data, rng)
        rows.append(row)
        truth["duplicates"].append({"image_id": row["_id"], "copy_of": orig["_id"], "kind": kind,
                                    "alteration": how})
    for j in range(n_corrupt):
        base = rows[int(rng.integers(0, n_orig))]["_bytes"]
        data, how = ((base[: len(base) // 2], "truncated to half its bytes") if j % 2 == 0
                     else (rng.bytes(200), "random bytes"))
        row = _row(n_orig + n_dups + j, sources[j % len(sources)], "detritus", data, rng)
        rows.append(row)
        truth["corrupt"].append({"image_id": row["_id"], "problem": how})
    order = rng.permutation(len(rows))  # copies and corrupt rows land anywhere
    rows = [rows[i] for i in order]
    _write_parquet(rows, out, rows_per_file, row_group_size)
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


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


def _write_parquet(rows: list[dict], out: Path, rows_per_file: int, row_group_size: int) -> None:
    schema = pa.schema(
        [pa.field("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))]
        + [pa.field(c, pa.bool_() if c == "plankton" else
                    pa.float32() if c in ("Latitude", "Longitude", "Depth_min", "Depth_max",
                                          "Humidity", "Temperature") else pa.string())
           for c in PARQUET_COLUMNS if c != "image"],
        metadata={"huggingface": json.dumps({"info": {"features": {
            "image": {"_type": "Image"}}}})},
    )
    n_files = max(1, math.ceil(len(rows) / rows_per_file))
    for f in range(n_files):
        chunk = rows[f * rows_per_file : (f + 1) * rows_per_file]
        table = pa.Table.from_pylist([{c: r[c] for c in schema.names} for r in chunk], schema=schema)
        pq.write_table(table, out / f"train-{f:05d}-of-{n_files:05d}.parquet", row_group_size=row_group_size)


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
            pixels = np.asarray(_finish(TAXA[names[int(rng.integers(0, len(names)))]][0](rng), rng, False))
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
