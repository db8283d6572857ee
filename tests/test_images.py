import io

import numpy as np
import pytest
from PIL import Image

from pzscale import images


def _encode(arr, fmt="PNG", mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def test_decode_keeps_mode_and_values():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (13, 29), dtype=np.uint8)
    rgb = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    deep = rng.integers(0, 65536, (6, 4), dtype=np.uint16)
    np.testing.assert_array_equal(images.decode(_encode(grey)), grey)
    np.testing.assert_array_equal(images.decode(_encode(rgb)), rgb)
    out16 = images.decode(_encode(deep))
    assert out16.shape == (6, 4)
    np.testing.assert_array_equal(out16.astype(np.int64), deep.astype(np.int64))


def test_decode_expands_palette_to_rgb():
    img = Image.new("P", (4, 3))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = images.decode(buf.getvalue())
    assert out.shape == (3, 4, 3)
    assert tuple(out[1, 1]) == (255, 0, 0) and tuple(out[0, 0]) == (0, 0, 0)


@pytest.mark.parametrize("data", [b"", b"not an image", None])
def test_probe_rejects_undecodable(data):
    with pytest.raises((OSError, SyntaxError, ValueError)):
        images.probe(data)


def test_probe_rejects_truncated_png():
    arr = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    data = _encode(arr)
    assert images.probe(data) == (64, 64, "L")
    with pytest.raises((OSError, SyntaxError, ValueError)):
        images.probe(data[: len(data) // 2])


def test_letterbox_keeps_aspect_and_records_scale():
    img = np.full((50, 200), 210, np.uint8)
    img[20:30, 10:190] = 20  # a dark elongated organism
    out, scale = images.letterbox(img, 100)
    assert out.shape == (100, 100, 3) and out.dtype == np.uint8
    assert scale == pytest.approx(0.5)
    # 200x50 -> 100x25 centred: rows 0..37 and 63..99 are padding with the background value
    assert (out[:37] == 210).all() and (out[63:] == 210).all()
    assert out[50, 50, 0] < 60  # the organism is still there


def test_letterbox_upscales_tiny_images_and_handles_16_bit():
    out, scale = images.letterbox(np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000, 224)
    assert out.shape == (224, 224, 3)
    assert scale == pytest.approx(56.0)
