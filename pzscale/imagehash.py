"""Image hash kernels for deduplication: an exact hash of decoded pixels and a 64-bit perceptual hash (pHash).

Plain functions on decoded pixel arrays (numpy, PIL, scipy), vectorised over a batch where the arithmetic allows:

- ``pixel_hash``: blake2b-128 of the pixel values together with their dtype and shape, as two uint64 words. It
  does not depend on the file format, so an image re-encoded losslessly (JPEG pixels saved as PNG, raw IFCB ROI
  bytes wrapped in a PNG) hashes the same; a grey image and its RGB copy do not (other pixel values).
- ``phash``: the pHash of imagededup (``imagededup.methods.PHash``), bit for bit on 8-bit images: greyscale
  via RGB, 32 x 32 Lanczos resize (PIL), 2-D DCT-II, the top-left 8 x 8 coefficients, bit = coefficient >=
  median of the 63 AC coefficients; the 64 bits are read row by row, first bit most significant, so
  ``int(imagededup_hex, 16) == phash``. Only the resize runs per image (PIL); the DCT runs once per batch.
  Images deeper than 8 bits (16-bit, float) are first stretched to 8 bits (min-max, as ``images.letterbox``),
  where imagededup would clip them; an alpha channel is dropped, as imagededup does.
- ``dct_profiles``: the 63 AC coefficients pHash thresholds, kept as numbers (orthonormal DCT scaling, unit
  length). The dot product of two profiles is the correlation of the two thumbnails low-passed to that 8 x 8
  band (Parseval), a finer check than the 64 sign bits: unrelated ROIs of similar shape and angle often fall
  within a few bits of each other, but not within 0.97 correlation (see ``dedup``).
- ``hamming``: Hamming distances between uint64 hashes (numpy's popcount).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import scipy.fft
from PIL import Image

from pzscale.images import _to_uint8

PHASH_SIZE = 32  # the grey thumbnail the DCT runs on
PHASH_LOW = 8  # the top-left low-frequency block that makes the 64 bits
PROFILE_LEN = PHASH_LOW * PHASH_LOW - 1  # its AC coefficients
_BIT_WEIGHTS = (np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def pixel_hash(pixels: np.ndarray) -> tuple[int, int]:
    """blake2b-128 of the pixels' dtype, shape and values, as two unsigned 64-bit words (big-endian halves)."""
    arr = np.ascontiguousarray(pixels)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{arr.dtype.str}|{arr.shape}|".encode())
    digest.update(memoryview(arr).cast("B"))
    raw = digest.digest()
    return int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:], "big")


def pixel_hashes(batch: Sequence[np.ndarray]) -> np.ndarray:
    """``pixel_hash`` of every image: (n, 2) uint64."""
    out = np.zeros((len(batch), 2), np.uint64)
    for i, pixels in enumerate(batch):
        out[i] = pixel_hash(pixels)
    return out


def grey_thumbnail(pixels: np.ndarray) -> np.ndarray:
    """The 32 x 32 uint8 greyscale thumbnail imagededup hashes: resize (Lanczos) in RGB, then convert to L.

    A grey image is resized directly in L mode: for R = G = B, PIL's L conversion returns the value exactly,
    so the result is the same as imagededup's grey -> RGB -> resize -> L, at a third of the cost.
    """
    arr = np.asarray(pixels)
    if arr.ndim == 3 and arr.shape[2] in (1, 2):  # grey (+ alpha): the alpha is dropped
        arr = arr[:, :, 0]
    elif arr.ndim == 3:
        arr = arr[:, :, :3]
    arr = _to_uint8(arr)
    img = Image.fromarray(np.ascontiguousarray(arr), "L" if arr.ndim == 2 else "RGB")
    small = img.resize((PHASH_SIZE, PHASH_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(small if small.mode == "L" else small.convert("L"))


def low_dct(thumbnails: np.ndarray) -> np.ndarray:
    """The top-left (n, 8, 8) DCT-II coefficients (scipy's default scaling) of (n, 32, 32) grey thumbnails.

    The DCT is taken along rows, then columns, as imagededup's ``dct(dct(x, axis=0), axis=1)``, with the same
    pocketfft kernel, so the coefficients and the median ties come out identical.
    """
    x = np.asarray(thumbnails, np.float64)
    return scipy.fft.dct(scipy.fft.dct(x, axis=1), axis=2)[:, :PHASH_LOW, :PHASH_LOW]


def phash_bits(coef: np.ndarray) -> np.ndarray:
    """pHash bits (n, 8, 8) bool from ``low_dct`` coefficients: each coefficient >= the median of the 63 AC."""
    flat = coef.reshape(len(coef), -1)
    median = np.median(flat[:, 1:], axis=1)
    return (coef >= median[:, None, None])


def dct_profiles(coef: np.ndarray) -> np.ndarray:
    """(n, 63) float32 unit vectors from ``low_dct`` coefficients: the AC terms in orthonormal scaling.

    scipy's unnormalised DCT-II weighs frequency 0 of each axis by sqrt(2) more than the others; dividing that
    row and column by sqrt(2) makes the transform orthonormal up to one factor, so dot products of profiles are
    correlations of the band-limited thumbnails. A flat thumbnail (no AC energy) has a zero profile.
    """
    c = np.array(coef, np.float64, copy=True)
    c[:, 0, :] /= np.sqrt(2.0)
    c[:, :, 0] /= np.sqrt(2.0)
    ac = c.reshape(len(c), -1)[:, 1:]
    norm = np.linalg.norm(ac, axis=1, keepdims=True)
    return np.divide(ac, norm, out=np.zeros_like(ac), where=norm > 0).astype(np.float32)


def phashes_and_profiles(batch: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``phashes`` and ``dct_profiles`` of every image from one resize and one DCT: (n,) uint64, (n, 63)."""
    if not len(batch):
        return np.zeros(0, np.uint64), np.zeros((0, PROFILE_LEN), np.float32)
    coef = low_dct(np.stack([grey_thumbnail(p) for p in batch]))
    return pack_bits(phash_bits(coef)), dct_profiles(coef)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """(n, 8, 8) bool -> (n,) uint64, first bit most significant."""
    flat = np.asarray(bits, bool).reshape(len(bits), -1).astype(np.uint64)
    return (flat * _BIT_WEIGHTS).sum(axis=1, dtype=np.uint64)


def phashes(batch: Sequence[np.ndarray]) -> np.ndarray:
    """64-bit pHash of every image (n,) uint64."""
    return phashes_and_profiles(batch)[0]


def to_hex(value: int | np.integer) -> str:
    """The 16-character hex string imagededup writes for a hash."""
    return f"{int(value):016x}"


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Hamming distances between uint64 hashes (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))
