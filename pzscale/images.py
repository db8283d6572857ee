"""Pixel decoding and the model-ready letterbox view. Plain functions on bytes and arrays.

Every decode first checks the size the image declares against ``limits.current()``, so a
decompression bomb (a few bytes declaring 100000 x 100000 pixels) fails before any pixel
memory is taken, with a message naming the limit.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from pzscale import limits


def _open_checked(data: bytes, max_pixels: int | None) -> Image.Image:
    """Open (header only) and refuse an image declaring more pixels than the limit."""
    limit = max_pixels or limits.current().max_image_pixels
    try:
        with warnings.catch_warnings():
            # pzscale applies its own limit below; PIL's warning band (MAX_IMAGE_PIXELS..2x) would only be noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # PIL's own message names the BytesIO object's address, which differs every run.
        raise ValueError(f"not a recognised image format (starts with {data[:8]!r})") from None
    except Image.DecompressionBombError as e:  # beyond twice PIL's MAX_IMAGE_PIXELS, whatever pzscale's limit
        raise ValueError(f"decompression bomb refused by PIL: {e}") from None
    width, height = img.size
    if width * height > limit:
        img.close()
        raise ValueError(f"image declares {width} x {height} = {width * height:,} pixels, over the limit of "
                         f"{limit:,} ({limits.ENV['max_image_pixels']}): a decompression bomb?")
    return img


def decode(data: bytes, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded image bytes to the pixels PIL gives for them, in the file's own mode.

    Greyscale images come back as (H, W), colour as (H, W, C). Palette images are
    expanded to RGB(A) so that a pixel value means an intensity, not a palette index.
    Raises ValueError for an image over ``max_pixels`` (default: the current limits).
    """
    with _open_checked(data, max_pixels) as img:
        img.load()
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        return np.asarray(img)


def probe(data: bytes | None, *, max_pixels: int | None = None) -> tuple[int, int, str]:
    """Fully decode ``data`` and return (height, width, mode); raise if it does not decode.

    A full decode, not a header read, so that truncated files are caught at ingest; an image
    declaring more than ``max_pixels`` (default: the current limits) is refused before decoding.
    """
    if not data:
        raise ValueError("no image bytes")
    with _open_checked(data, max_pixels) as img:
        img.load()
        return img.height, img.width, img.mode


def letterbox(pixels: np.ndarray, size: int = 224) -> tuple[np.ndarray, float]:
    """Fit an image into a ``size`` x ``size`` RGB square keeping its aspect ratio.

    Returns the (size, size, 3) uint8 array and the scale applied (output px per
    source px). The scale is what keeps the organism's size, which is biological
    signal, recoverable after resizing. The border is filled with the median of the
    image's edge pixels so padding looks like background, not like a frame.
    """
    img = Image.fromarray(_to_uint8(pixels)).convert("RGB")
    h, w = img.height, img.width
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = np.asarray(img.resize((new_w, new_h), Image.Resampling.BILINEAR))
    rgb = np.asarray(img)
    edges = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    out = np.empty((size, size, 3), np.uint8)
    out[:] = np.median(edges, axis=0).astype(np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out, scale


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == bool:
        return pixels.astype(np.uint8) * 255
    # 16-bit and float images: stretch the full range into 8 bits for the model view only.
    lo, hi = float(pixels.min()), float(pixels.max())
    scaled = (pixels.astype(np.float64) - lo) / (hi - lo or 1.0)
    return np.round(scaled * 255).astype(np.uint8)
