"""Model input batches from decoded pixels: square padding on the CPU, resizing and normalisation on the device.

The CPU does only the cheap, per-pixel steps (``images.to_grey_or_rgb``: colour space, 8-bit depth, alpha; then
padding); the resize, the only costly step, runs where the model runs. Padding before resizing, rather than after as
``images.letterbox`` does, lets one resize per image handle any aspect ratio and keeps the uploaded
tensor uint8 (4x less to copy than float32).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pzscale.errors import InputError
from pzscale.images import to_grey_or_rgb

__all__ = ["pad_square", "prepare_batch"]


def pad_square(pixels: np.ndarray) -> np.ndarray:
    """Pad one decoded image to a centred square at its own resolution, without resampling.

    Parameters
    ----------
    pixels
        (H, W) grey, (H, W, 1|2) grey(+alpha), (H, W, 3) RGB or (H, W, 4) RGBA; any integer, float or bool dtype.

    Returns
    -------
    (side, side) or (side, side, 3) uint8 with ``side = max(H, W)``. Converted by ``images.to_grey_or_rgb``, as
    ``images.letterbox`` does (alpha composited on white, deeper images scaled to 8 bits by their type's range),
    and the padding is the median of the border pixels (per channel) so that it looks like background, not like
    a frame.
    """
    pixels = np.asarray(pixels)
    if pixels.size == 0:
        raise InputError(f"cannot pad an empty image of shape {pixels.shape}")
    pixels = to_grey_or_rgb(pixels)
    h, w = pixels.shape[:2]
    side = max(h, w)
    edges = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    # Same rounding as images.letterbox (truncation), so both views use the same background value.
    fill = np.median(edges, axis=0).astype(np.uint8)
    out = np.empty((side, side, *pixels.shape[2:]), np.uint8)
    out[:] = fill
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = pixels
    return out


def prepare_batch(
    pixels: Sequence[np.ndarray],
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, np.ndarray]:
    """Turn decoded images of any size into one normalised model batch on ``device``.

    Parameters
    ----------
    pixels
        Decoded images as ``images.decode`` returns them (grey, RGB, with or without alpha; 8 or 16 bit, float).
    size
        Side of the square model input.
    mean, std
        Per-channel normalisation of the [0, 1] RGB values (e.g. ``models.OPENAI_MEAN``/``OPENAI_STD``).
    device
        Where the resize and normalisation run and the batch is returned.

    Returns
    -------
    batch
        (N, 3, size, size) float32 on ``device``.
    scale
        (N,) float32, ``size / max(H, W)`` per image: output pixels per source pixel. Organism size is
        biological signal that resizing hides, so callers store it beside the predictions.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    device = torch.device(device)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    out = torch.empty((len(pixels), 3, size, size), dtype=torch.float32, device=device)
    scales = np.empty(len(pixels), np.float32)
    # Images of one square side (frequent within an instrument) share one interpolate call.
    groups: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    for index, image in enumerate(pixels):
        square = pad_square(image)
        scales[index] = size / square.shape[0]
        channels = 1 if square.ndim == 2 else 3
        groups.setdefault((square.shape[0], channels), []).append((index, square))
    for (_, channels), members in groups.items():
        indices = [index for index, _ in members]
        stacked = np.stack([square.reshape(*square.shape[:2], channels) for _, square in members])
        uploaded = torch.from_numpy(stacked).to(device)  # uint8 over the bus
        images = uploaded.permute(0, 3, 1, 2).to(torch.float32)
        if images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[indices] = images.expand(-1, 3, -1, -1)
    out.div_(255.0).sub_(mean_t).div_(std_t)
    return out, scales
