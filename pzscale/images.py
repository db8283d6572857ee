"""Pixel decoding, the model-ready letterbox view and a fast PNG encoder. Plain functions on bytes and arrays.

Every decode first checks the size the image declares against ``limits.current()``, so a
decompression bomb (a few bytes declaring 100000 x 100000 pixels) fails before any pixel
memory is taken, with a message naming the limit.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from pzscale import limits
from pzscale.errors import InputError


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
    """Decode encoded image bytes to intensities at the file's own depth: grey or RGB, with alpha if it has one.

    Greyscale images come back as (H, W), colour as (H, W, C), 8-bit, 16-bit, float or bool as the
    file stores them. Colour spaces whose values are no intensities (palette, CMYK, YCCK) are
    converted to RGB(A) by ``_intensity_mode``, so that C = 2 or 4 always means alpha.
    Raises ValueError for an image over ``max_pixels`` (default: the current limits).
    """
    with _open_checked(data, max_pixels) as img:
        img.load()
        return np.asarray(_intensity_mode(img))


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


# Modes whose array values are intensities that ``to_grey_or_rgb`` reads directly (PIL gives 16-bit files as I;16*).
_INTENSITY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F", "RGB", "RGBA"}
BACKGROUND = 255  # what transparent pixels are composited on: white (bright-field imagers; white pages)


def _intensity_mode(img: Image.Image) -> Image.Image:
    """``img`` in a mode whose values are intensities (``_INTENSITY_MODES``), at its own depth, alpha kept.

    - CMYK becomes RGB by PIL's plain formula (R = (255 - C)(255 - K) / 255, ...). This covers Adobe's inverted CMYK
      JPEGs (PIL un-inverts them on read, from the APP14 marker) and YCCK JPEGs (libjpeg hands PIL CMYK). An embedded
      ICC profile is not applied: building an ImageCms transform takes ~0.1 s per profile, and the plain formula is
      what imagededup uses, so the pHash of a CMYK file stays imagededup's (see ``imagehash``).
    - Palette images become RGBA if they have a transparent entry, else RGB, so a value is a colour, not an index.
    - Any other mode (YCbCr, LAB, HSV, PA, La, RGBa, ...) becomes RGB, or RGBA if it has alpha, through PIL.
    """
    if img.mode in _INTENSITY_MODES:
        return img
    if img.mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    return img.convert("RGBA" if img.mode.upper().endswith("A") else "RGB")


def to_rgb(pixels: np.ndarray | Image.Image) -> np.ndarray:
    """The model's colour space: (H, W, 3) uint8 RGB from a PIL image of any mode or an array as ``decode`` gives.

    This and ``to_grey`` are the one place pixels become model input (``letterbox``, ``ml.preprocess``); see
    ``to_grey_or_rgb`` for the rules.
    """
    flat = to_grey_or_rgb(pixels)
    return np.repeat(flat[:, :, None], 3, axis=2) if flat.ndim == 2 else flat


def to_grey(pixels: np.ndarray | Image.Image) -> np.ndarray:
    """(H, W) uint8 greyscale: grey images as ``to_grey_or_rgb`` gives them, colour by PIL's L (ITU-R 601-2 luma)."""
    flat = to_grey_or_rgb(pixels)
    return flat if flat.ndim == 2 else np.asarray(Image.fromarray(flat, "RGB").convert("L"))


def to_grey_or_rgb(pixels: np.ndarray | Image.Image) -> np.ndarray:
    """(H, W) uint8 grey or (H, W, 3) uint8 RGB, whichever the image is, with no alpha channel.

    ``pixels`` is a PIL image of any mode (first put in an intensity mode, see ``_intensity_mode``) or an array as
    ``decode`` returns: (H, W) or (H, W, 1) grey, (H, W, 2) grey + alpha, (H, W, 3) RGB, (H, W, 4) RGBA.
    Depth is brought to 8 bits by ``_scale_to_uint8`` (deep images stretched, never clipped); alpha is composited
    on ``BACKGROUND`` (white), so a transparent pixel's hidden colour never reaches the model.
    """
    arr = np.asarray(_intensity_mode(pixels) if isinstance(pixels, Image.Image) else pixels)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return _scale_to_uint8(arr)
    if arr.ndim != 3 or arr.shape[2] not in (2, 3, 4):
        raise InputError(f"expected (H, W), (H, W, 1..4) pixels, got shape {arr.shape}")
    colour = _scale_to_uint8(arr[:, :, : 1 if arr.shape[2] == 2 else 3])
    if arr.shape[2] in (2, 4):
        alpha = np.clip(arr[:, :, -1:].astype(np.float64) / _type_max(arr), 0.0, 1.0)
        if (alpha < 1).any():
            colour = np.round(colour * alpha + BACKGROUND * (1 - alpha)).astype(np.uint8)
    return colour[:, :, 0] if colour.shape[2] == 1 else colour


def _type_max(arr: np.ndarray) -> float:
    """The full-intensity value of an array's type: 255 for 8 bits, 65535 for 16 (and PIL's int32 I), 1 for floats."""
    if arr.dtype == bool or arr.dtype.kind == "f":
        return 1.0
    return 65535.0 if arr.dtype.kind == "i" else float(np.iinfo(arr.dtype).max)


def _scale_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """8 bits: 8-bit data as is, deeper data (16-bit, 32-bit, float) stretched min-max per image, bool as 0/255.

    Not by the type's range: cameras write 10-, 12- or 14-bit counts into 16-bit files, so the range of the
    type says nothing of the data's (a 12-bit image scaled by 65535 would be nearly black); and not PIL's
    ``convert("L")``, which clips 16-bit values above 255 to 255 (an almost white image). The pHash sees
    deep images the same way (``imagehash``).
    """
    return _to_uint8(pixels)


def letterbox(pixels: np.ndarray, size: int = 224) -> tuple[np.ndarray, float]:
    """Fit an image into a ``size`` x ``size`` RGB square keeping its aspect ratio.

    Returns the (size, size, 3) uint8 array and the scale applied (output px per
    source px). The scale is what keeps the organism's size, which is biological
    signal, recoverable after resizing. The border is filled with the median of the
    image's edge pixels so padding looks like background, not like a frame.
    """
    img = Image.fromarray(to_rgb(pixels), "RGB")
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
    """8 bits by min-max stretch (bool: 0/255): the view of deep images of the model and of the pHash."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == bool:
        return pixels.astype(np.uint8) * 255
    lo, hi = float(pixels.min()), float(pixels.max())
    scaled = (pixels.astype(np.float64) - lo) / (hi - lo or 1.0)
    return np.round(scaled * 255).astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """A PNG of 8-bit grey (h, w) or RGB (h, w, 3) pixels: PNG's Sub filter on every row, deflated by Huffman
    coding alone (sensor noise leaves LZ77 matching little to find); ``pzscale synth``'s PNGs.

    3-4x faster than PIL's encoder at level 1 (which tries five filters on every row), as small on grey images
    (10% larger on tinted RGB ones); PIL decodes it to the same pixels (tested).
    """
    h, w = pixels.shape[:2]
    step = 1 if pixels.ndim == 2 else 3  # bytes per pixel: Sub takes each byte less the same byte one pixel left
    flat = pixels.reshape(h, -1)
    rows = np.empty((h, 1 + flat.shape[1]), np.uint8)
    rows[:, 0] = 1  # filter type: Sub
    rows[:, 1 : 1 + step] = flat[:, :step]
    np.subtract(flat[:, step:], flat[:, :-step], out=rows[:, 1 + step :])  # modulo 256, as PNG wants
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_HUFFMAN_ONLY)
    data = deflate.compress(rows.tobytes()) + deflate.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, 0 if pixels.ndim == 2 else 2, 0, 0, 0)  # colour type: grey, RGB
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        for kind, body in ((b"IHDR", header), (b"IDAT", data), (b"IEND", b"")))
