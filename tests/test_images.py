import io
from pathlib import Path

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


# ---------------------------------------------------------------- colour spaces, on files written by other tools

COLOUR = Path(__file__).parent / "data" / "colour"  # see SOURCE.txt there: what wrote each file, and how
# 16 x 8 blocks of the pattern, sampled away from their edges (JPEG blocks are 8 x 8 and aligned to them)
BLOCKS = {"red": (slice(2, 6), slice(4, 12)), "green": (slice(2, 6), slice(20, 28)),
          "blue": (slice(10, 14), slice(4, 12)), "white": (slice(10, 14), slice(20, 28)),
          "black": (slice(18, 22), slice(4, 12)), "corner": (slice(18, 22), slice(20, 28))}
RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255), "black": (0, 0, 0)}
# the grey files' four 16 x 12 levels, sampled away from their edges: 12.5 %, 25 %, 50 %, 75 % of the range
GREY_BLOCKS = [(slice(2, 10), slice(4, 12)), (slice(2, 10), slice(20, 28)),
               (slice(14, 22), slice(4, 12)), (slice(14, 22), slice(20, 28))]
LEVELS = (32, 64, 128, 191)


def _views(name):
    """Every model view of a file: to_rgb of the decoded array and of the PIL image, and the two model inputs
    (letterbox and pad_square, both at the image's own width: 32 x 24 centred in 32 x 32, rows 4..27)."""
    from pzscale.ml.preprocess import pad_square

    data = (COLOUR / name).read_bytes()
    pixels = images.decode(data)
    with Image.open(COLOUR / name) as img:
        from_pil = images.to_rgb(img)
    square = pad_square(pixels)
    square = np.repeat(square[:, :, None], 3, axis=2) if square.ndim == 2 else square
    return {"to_rgb": images.to_rgb(pixels), "to_rgb(PIL)": from_pil,
            "letterbox": images.letterbox(pixels, 32)[0][4:28], "pad_square": square[4:28]}


@pytest.mark.parametrize(("name", "mode", "corner"), [
    ("ycck.jpg", "CMYK", "black"),  # libjpeg turns YCCK into CMYK for PIL
    ("cmyk_adobe.jpg", "CMYK", "black"),  # inverted (Adobe) CMYK, which PIL un-inverts
    ("palette.png", "P", "black"),
    ("palette_alpha.png", "P", "white"),  # transparent corner: composited on white
    ("palette_alpha.gif", "P", "white"),
    ("rgba.png", "RGBA", "white"),  # alpha 0 over black: white, not the hidden black
])
def test_colour_files_reach_the_model_as_rgb_with_their_true_colours(name, mode, corner):
    with Image.open(COLOUR / name) as img:  # the file is the kind SOURCE.txt says
        assert img.mode == mode
        assert img.info.get("adobe_transform") == {"ycck.jpg": 2, "cmyk_adobe.jpg": 0}.get(name)
        assert ("transparency" in img.info) == (name.startswith("palette_alpha"))
    assert images.decode((COLOUR / name).read_bytes()).shape[2] == (4 if corner == "white" else 3)
    for view, rgb in _views(name).items():
        assert rgb.shape == (24, 32, 3) and rgb.dtype == np.uint8, view
        for block, (rows, cols) in BLOCKS.items():
            expected = RGB[corner if block == "corner" else block]
            mean = rgb[rows, cols].reshape(-1, 3).mean(axis=0)
            # CMYK read as RGB(A) would make red cyan: every channel off by 255
            assert np.abs(mean - expected).max() < 8, (view, block, mean.round(), expected)


@pytest.mark.parametrize(("name", "mode", "dtype"), [
    ("grey16.png", "I;16", np.uint16), ("grey16_msb.tif", "I;16B", np.dtype(">u2")), ("float32.tif", "F", np.float32)])
def test_deep_grey_files_are_stretched_not_clipped(name, mode, dtype):
    data = (COLOUR / name).read_bytes()
    with Image.open(COLOUR / name) as img:
        assert img.mode == mode
        if mode == "I;16":  # what the scaling avoids: PIL's own 8-bit view clips the image to white
            assert (np.asarray(img.convert("L")) == 255).all()
    pixels = images.decode(data)
    assert pixels.dtype == dtype and pixels.shape == (24, 32)  # decode keeps the file's depth (pixel hashes)
    assert round(float(pixels[0, 0]) * (1 if mode == "F" else 1 / 65535), 3) == 0.125
    grey = images.to_grey(pixels)
    assert grey.dtype == np.uint8 and grey.shape == (24, 32)
    lo, hi = min(LEVELS), max(LEVELS)
    for (rows, cols), level in zip(GREY_BLOCKS, LEVELS, strict=True):
        # stretched from the image's own range (12-bit counts in a 16-bit file stay visible), never clipped to 255
        stretched = round((level - lo) / (hi - lo) * 255)
        assert np.abs(grey[rows, cols].astype(int) - stretched).max() <= 1, (rows, cols, level)
    for view, rgb in _views(name).items():
        assert rgb.shape == (24, 32, 3) and rgb.dtype == np.uint8, view
        np.testing.assert_array_equal(rgb, np.repeat(grey[:, :, None], 3, axis=2), err_msg=view)


def test_grey_with_alpha_and_one_bit_files():
    with Image.open(COLOUR / "grey_alpha.png") as img, Image.open(COLOUR / "bilevel.png") as bilevel:
        assert img.mode == "LA" and bilevel.mode == "1"
    pixels = images.decode((COLOUR / "grey_alpha.png").read_bytes())
    assert pixels.shape == (24, 32, 2)
    # the 8-bit levels, the transparent one composited on white, not the hidden 75 % grey
    for view, rgb in _views("grey_alpha.png").items():
        for (rows, cols), level in zip(GREY_BLOCKS, (31, 63, 127, 255), strict=True):
            assert (rgb[rows, cols] == level).all(), (view, level)
    one_bit = images.to_grey(images.decode((COLOUR / "bilevel.png").read_bytes()))
    assert one_bit.dtype == np.uint8
    assert [int(one_bit[r, c].mean()) for r, c in BLOCKS.values()] == [0, 255, 0, 255, 0, 0]  # red..corner


@pytest.mark.parametrize("name", ["ycck.jpg", "cmyk_adobe.jpg"])
def test_cmyk_files_hash_as_their_rgb_picture_and_as_imagededup(name):
    from pzscale import imagehash

    cmyk, reference = (images.decode((COLOUR / n).read_bytes()) for n in (name, "reference.png"))
    # the greyscale views hashing and to_grey take: those of the RGB picture, not of its negative
    for grey, want in [(imagehash.grey_thumbnail(cmyk), imagehash.grey_thumbnail(reference)),
                       (images.to_grey(cmyk), images.to_grey(reference))]:
        assert grey.dtype == np.uint8 and grey.ndim == 2
        assert np.abs(grey.astype(int) - want).mean() < 3
    phash = pytest.importorskip("imagededup.methods").PHash(verbose=False)
    assert imagehash.to_hex(imagehash.phashes([cmyk])[0]) == phash.encode_image(image_file=str(COLOUR / name))


def test_deep_arrays_are_stretched_and_shapes_are_checked():
    from pzscale.errors import InputError

    as_i = np.array([[1000, 2048, 4095]], np.int32)  # PIL's 32-bit mode I holding 12-bit counts: stretched
    assert images.to_grey(as_i).tolist() == [[0, 86, 255]]
    signed = np.array([[-5, 0, 5]], np.int32)  # no range to scale by: min-max stretch, not a wrap-around
    assert images.to_grey(signed).tolist() == [[0, 128, 255]]
    assert images.to_grey(np.array([[0.0, 2.0]], np.float32)).tolist() == [[0, 255]]  # float beyond [0, 1]
    with pytest.raises(InputError, match="expected"):
        images.to_rgb(np.zeros((4, 4, 5), np.uint8))
