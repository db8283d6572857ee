"""Model batches from decoded pixels: square padding, resizing, normalisation, and agreement with images.letterbox."""

import numpy as np
import pytest
import torch

from pzscale import images
from pzscale.errors import InputError
from pzscale.ml.preprocess import pad_square, prepare_batch

torch.set_num_threads(2)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _organism(h, w, seed=0, background=200):
    """A smooth dark blob on a light background (what a resampler treats the same whichever library it is)."""
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-(((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2))
    noise = np.random.default_rng(seed).normal(0, 2, (h, w))
    return np.clip(background - 150 * blob + noise, 0, 255).astype(np.uint8)


def _normalise(letterboxed):
    x = torch.from_numpy(letterboxed).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def test_shapes_dtype_and_scales():
    pixels = [_organism(50, 200), _organism(120, 30, 1), _organism(64, 64, 2), _organism(300, 310, 3)]
    batch, scale = prepare_batch(pixels, size=64, mean=MEAN, std=STD)
    assert batch.shape == (4, 3, 64, 64) and batch.dtype == torch.float32 and batch.device.type == "cpu"
    assert scale.dtype == np.float32
    np.testing.assert_allclose(scale, [64 / 200, 64 / 120, 1.0, 64 / 310], rtol=1e-6)


def test_empty_list():
    batch, scale = prepare_batch([], size=32, mean=MEAN, std=STD)
    assert batch.shape == (0, 3, 32, 32) and scale.shape == (0,)


def test_padding_is_centred_and_uses_the_border_median():
    img = np.full((10, 30), 180, np.uint8)
    img[0, :3] = 0  # a few dark border pixels do not move the median
    img[3:7, 5:25] = 20
    square = pad_square(img)
    assert square.shape == (30, 30) and square.dtype == np.uint8
    # (30 - 10) // 2 = 10 rows above, 10 below, filled with the border median.
    assert (square[:10] == 180).all() and (square[20:] == 180).all()
    np.testing.assert_array_equal(square[10:20], img)
    odd = pad_square(np.zeros((7, 4, 3), np.uint8) + np.array([10, 20, 30], np.uint8))
    assert odd.shape == (7, 7, 3)
    # (7 - 4) // 2 = 1 column on the left and 2 on the right, as images.letterbox centres.
    assert (odd[:, 0] == [10, 20, 30]).all() and (odd[:, 5:] == [10, 20, 30]).all()


def test_padding_placement_after_resize_matches_letterbox():
    img = np.full((50, 200), 210, np.uint8)
    img[20:30, 10:190] = 20
    batch, scale = prepare_batch([img], size=100, mean=(0, 0, 0), std=(1, 1, 1))
    reference, ref_scale = images.letterbox(img, 100)
    assert scale[0] == pytest.approx(ref_scale)
    pixels = (batch[0] * 255).round().permute(1, 2, 0).numpy()
    # 200x50 -> 100x25 centred: rows 0..36 and 63..99 are pure padding in both views (the content
    # edge itself differs by half a pixel, padding before rather than after the resize).
    assert (reference[:37] == 210).all() and (reference[63:] == 210).all()
    assert (pixels[:37] == 210).all() and (pixels[63:] == 210).all()
    assert (pixels[48:52, 10:90] < 100).all() and (reference[48:52, 10:90] < 100).all()


@pytest.mark.parametrize("shape", [(90, 150), (150, 90), (77, 77)])
def test_close_to_images_letterbox(shape):
    img = _organism(*shape)
    batch, _ = prepare_batch([img], size=64, mean=MEAN, std=STD)
    reference = _normalise(images.letterbox(img, 64)[0])
    # PIL and torch resample differently and letterbox rounds to uint8: compare in [0, 1] units.
    diff = (batch[0] - reference) * torch.tensor(STD).view(3, 1, 1)
    assert diff.abs().mean() < 0.01
    assert diff.abs().max() < 0.1


def test_grey_rgb_rgba_and_16_bit_agree():
    grey = _organism(40, 60)
    grey[20, 30], grey[21, 30] = 0, 255  # the full 8-bit range, so that the 16-bit stretch is exact
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full((40, 60, 1), 255, np.uint8)], axis=2)  # opaque alpha changes nothing
    deep = grey.astype(np.uint16) * 257  # same picture in 16 bits: the stretch maps it back
    batch, _ = prepare_batch([grey, rgb, rgba, deep, grey[:, :, None]], size=48, mean=MEAN, std=STD)
    for i in range(1, 5):
        torch.testing.assert_close(batch[i], batch[0], atol=1e-5, rtol=0)
    # The grey image is expanded to three channels before per-channel normalisation.
    raw, _ = prepare_batch([grey], size=48, mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.equal(raw[0, 0], raw[0, 1]) and torch.equal(raw[0, 1], raw[0, 2])


def test_16_bit_is_stretched_to_its_range():
    deep = np.zeros((8, 8), np.uint16)
    deep[2:6, 2:6] = 1000  # a faint signal in a 16-bit range still spans 0..255
    raw, _ = prepare_batch([deep], size=8, mean=(0, 0, 0), std=(1, 1, 1))
    assert raw.min().item() == pytest.approx(0, abs=1e-6) and raw.max().item() == pytest.approx(1, abs=1e-6)


def test_colour_image_keeps_its_channels():
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[..., 0] = 255
    raw, _ = prepare_batch([rgb], size=10, mean=(0, 0, 0), std=(1, 1, 1))
    torch.testing.assert_close(raw[0, 0], torch.ones(10, 10))
    torch.testing.assert_close(raw[0, 1:], torch.zeros(2, 10, 10))


def test_rejects_unusable_shapes():
    with pytest.raises(InputError, match="expected"):
        prepare_batch([np.zeros((4, 4, 5), np.uint8)], size=8, mean=MEAN, std=STD)
    with pytest.raises(InputError, match="empty"):
        prepare_batch([np.zeros((0, 4), np.uint8)], size=8, mean=MEAN, std=STD)
