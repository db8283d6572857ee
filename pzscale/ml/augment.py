"""Training augmentation with kornia, reproducible per image, and the dihedral views for test-time averaging.

Each image's random parameters are drawn from its own seed (``seed_for(image_id, epoch)``), so an image is
augmented the same way whichever batch, worker or process it lands in, and a run can be replayed or audited
image by image. Sampling is done one image at a time (cheap: a few scalars and one noise field); applying is
done on the whole batch at once with the merged parameters, on the batch's device.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from typing import Any

import torch

with warnings.catch_warnings():
    # kornia 0.8.x decorates helpers with torch.jit.script, which torch >= 2.14 reports as deprecated on import.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    import kornia.augmentation as K
    from kornia.augmentation.container.params import ParamItem

__all__ = ["SeededGaussianNoise", "augment", "make_augmentation", "seed_for", "tta_views"]

# Parameter entries too big to record per image (e.g. the Gaussian noise field); the seed replays them.
_MAX_RECORDED_VALUES = 16


def make_augmentation(
    *,
    rotation: float = 180.0,
    flips: bool = True,
    scale: tuple[float, float] = (0.9, 1.1),
    blur_p: float = 0.2,
    noise_std: float = 0.02,
    brightness: float = 0.1,
    contrast: float = 0.1,
) -> K.AugmentationSequential:
    """The plankton training augmentation for (N, C, H, W) float batches, raw [0, 1] or already normalised.

    Plankton have no up or down in the image, so any rotation and both flips are label-preserving. Rotation
    and scale are one affine warp (one resampling, not two) with ``border`` padding, so the corners take the
    background colour instead of black. Blur (sigma 0.1..1.5, applied with probability ``blur_p``) mimics
    focus changes; brightness and contrast factors are drawn from ``1 ± brightness`` and ``1 ± contrast``
    (brightness adds ``factor - 1``, contrast multiplies by ``factor``, in the batch's own units); additive
    Gaussian noise of ``noise_std`` comes last, as sensor noise. Nothing is clamped, so a normalised batch
    (negative values) keeps its range. An op whose setting is 0 (or ``flips=False``, ``scale=(1, 1)``) is
    left out.
    """
    ops: list[K.AugmentationBase2D] = []
    if flips:
        ops += [K.RandomHorizontalFlip(p=0.5), K.RandomVerticalFlip(p=0.5)]
    if rotation or tuple(scale) != (1.0, 1.0):
        ops.append(K.RandomAffine(degrees=rotation, scale=tuple(scale), padding_mode="border", p=1.0))
    if blur_p > 0:
        # A 9 px kernel spans ±4 px, about 3 sigma of the widest blur.
        ops.append(K.RandomGaussianBlur(kernel_size=(9, 9), sigma=(0.1, 1.5), p=blur_p))
    if brightness > 0:
        # kornia clamps to [0, 1] by default, which would flatten every negative value of a normalised batch.
        ops.append(K.RandomBrightness(brightness=(1.0 - brightness, 1.0 + brightness), clip_output=False, p=1.0))
    if contrast > 0:
        ops.append(K.RandomContrast(contrast=(1.0 - contrast, 1.0 + contrast), clip_output=False, p=1.0))
    if noise_std > 0:
        ops.append(SeededGaussianNoise(std=noise_std))
    # Not kornia's ColorJitter: it draws one order of its sub-ops for the whole batch, which would tie an
    # image's output to the batch it is in. Separate ops have a fixed order and only per-image parameters.
    return K.AugmentationSequential(*ops, data_keys=["input"])


class SeededGaussianNoise(K.RandomGaussianNoise):
    """Additive Gaussian noise whose field is drawn with the other parameters, from the image's own seed.

    kornia 0.8 draws the field when applying, from one stream for the whole batch, which would tie an image's
    noise to its batch; kornia 0.9 draws it with the parameters. This behaves as 0.9 does on either release.
    """

    def __init__(self, std: float) -> None:
        super().__init__(mean=0.0, std=std, p=1.0)
        self.noise_std = std

    def generate_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        return {"gaussian_noise": torch.randn(tuple(batch_shape)) * self.noise_std}

    def apply_transform(
        self,
        input: torch.Tensor,
        params: dict[str, torch.Tensor],
        flags: dict[str, Any],
        transform: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return input + params["gaussian_noise"].to(device=input.device, dtype=input.dtype)


def seed_for(image_id: str, epoch: int, seed: int = 0) -> int:
    """A 63-bit seed for one image in one epoch, the same in every process (unlike the salted ``hash()``)."""
    digest = hashlib.blake2b(f"{seed}\x00{epoch}\x00{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch.manual_seed takes up to 2**63 - 1


def augment(
    batch: torch.Tensor, seeds: Sequence[int], aug: K.AugmentationSequential
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Augment each image of ``batch`` with the parameters its own seed draws.

    Parameters
    ----------
    batch
        (N, C, H, W) float images, raw or normalised, on any device.
    seeds
        One seed per image (``seed_for(image_id, epoch)``).
    aug
        An ``AugmentationSequential`` of image ops, e.g. from ``make_augmentation``.

    Returns
    -------
    augmented
        (N, C, H, W) on ``batch``'s device. Image i depends only on ``batch[i]`` and ``seeds[i]``.
    params
        Per image, a JSON-serialisable record: ``{"seed": ..., "<op>": {"applied": bool, <parameters>}}``
        (e.g. ``RandomAffine_2: {"angle": [...], "scale": [...]}``). Noise fields are not recorded; the seed
        replays them exactly.
    """
    if batch.ndim != 4:
        raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(batch.shape)}")
    if len(seeds) != batch.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {batch.shape[0]} images")
    if batch.shape[0] == 0:
        return batch.clone(), []
    one_shape = torch.Size((1, *batch.shape[1:]))
    per_image = []
    # kornia samples from the global CPU generator; fork it so callers' random streams are left untouched.
    with torch.random.fork_rng(devices=[]):
        for seed in seeds:
            torch.manual_seed(int(seed))
            per_image.append(aug.forward_parameters(one_shape))
    merged = [_merge(items, batch.shape) for items in zip(*per_image, strict=True)]
    augmented = aug(batch, params=merged)
    records = [{"seed": int(seed), **_record(items)} for seed, items in zip(seeds, per_image, strict=True)]
    return augmented, records


def tta_views(batch: torch.Tensor) -> list[torch.Tensor]:
    """The 8 dihedral views of a square batch: rotations by 0, 90, 180, 270 degrees, each also mirrored.

    Exact pixel permutations (no resampling), so averaging any per-view function over them is exactly
    invariant to rotating or mirroring the input by these angles.
    """
    views = []
    for k in range(4):
        rotated = torch.rot90(batch, k, dims=(-2, -1))
        views += [rotated, torch.flip(rotated, dims=(-1,))]
    return views


def _merge(items: tuple[ParamItem, ...], batch_shape: torch.Size) -> ParamItem:
    """One op's per-image parameters (each for a batch of 1) as the parameters of the whole batch."""
    first = items[0]
    if first.data is None:
        return first
    if not isinstance(first.data, dict):
        raise TypeError(f"nested augmentation containers are not supported (op {first.name})")
    data = {}
    for key, value in first.data.items():
        if key == "forward_input_shape":
            data[key] = torch.tensor(tuple(batch_shape), dtype=value.dtype)
        elif all(_per_image(item.data[key]) for item in items):
            # kornia 0.9 draws every image's values; 0.8 only those of images the op applies to (0 or 1 rows
            # here), and indexes them in order of the applied images, which the concatenation keeps.
            data[key] = torch.cat([item.data[key] for item in items])
        else:
            # A value shared across the batch (e.g. an op order) would make images depend on each other.
            if not all(torch.equal(torch.as_tensor(item.data[key]), torch.as_tensor(value)) for item in items):
                raise ValueError(f"{first.name}: parameter {key!r} is drawn per batch, not per image")
            data[key] = value
    return ParamItem(first.name, data)


def _per_image(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] <= 1


def _record(items: Sequence[ParamItem]) -> dict[str, Any]:
    """An image's sampled parameters as JSON types, one entry per op."""
    record: dict[str, Any] = {}
    for item in items:
        data = item.data if isinstance(item.data, dict) else {}
        applied = bool(data["batch_prob"].item() > 0.5) if "batch_prob" in data else True
        entry: dict[str, Any] = {"applied": applied}
        if applied:
            for key, value in data.items():
                if key in ("batch_prob", "forward_input_shape") or not isinstance(value, torch.Tensor):
                    continue
                if value.numel() <= _MAX_RECORDED_VALUES:
                    entry[key] = value.squeeze(0).tolist()
        record[item.name] = entry
    return record
