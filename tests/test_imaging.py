"""imgpipe/images.py: orientation, colour modes and letterbox geometry, checked pixel by pixel."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imgpipe.images import decode_rgb, letterbox, preprocess
from tests.images import encode

PAD = (10, 20, 30)


@pytest.mark.parametrize(
    ("size", "expected"),  # expected (width, height) of the content inside a 224 square
    [((300, 100), (224, 75)), ((100, 300), (75, 224)), ((50, 50), (224, 224)), ((10, 5), (224, 112)),
     ((4000, 3000), (224, 168))],
    ids=["wide", "tall", "square", "tiny-upscaled", "huge"],
)
def test_letterbox_geometry(size, expected):
    image = Image.new("RGB", size, (200, 100, 50))
    pixels, geometry = letterbox(image, 224, PAD)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    width, height = expected
    assert (geometry.width, geometry.height) == expected
    assert (geometry.offset_x, geometry.offset_y) == ((224 - width) // 2, (224 - height) // 2)
    inside = pixels[geometry.offset_y:geometry.offset_y + height, geometry.offset_x:geometry.offset_x + width]
    assert (inside == (200, 100, 50)).all()
    padding = np.ones((224, 224), bool)
    padding[geometry.offset_y:geometry.offset_y + height, geometry.offset_x:geometry.offset_x + width] = False
    assert (pixels[padding] == PAD).all()
    # The square's content corners map back onto the original's corners.
    assert geometry.to_original(geometry.offset_x, geometry.offset_y) == pytest.approx((0, 0))
    assert geometry.to_original(geometry.offset_x + width, geometry.offset_y + height) == pytest.approx(size, rel=0.02)


def marker() -> Image.Image:
    """An upright picture no rotation or mirror leaves unchanged: a red block top-left."""
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 10, 5))
    return image


STORED_FOR = {  # how a camera stores the upright picture for each EXIF orientation
    1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_honoured(orientation):
    stored = marker() if STORED_FOR[orientation] is None else marker().transpose(STORED_FOR[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode_rgb(encode(stored, "PNG", exif=exif.tobytes()))
    assert np.array_equal(np.asarray(decoded), np.asarray(marker()))


def single(mode: str, value, size=(4, 4), **save) -> bytes:
    return encode(Image.new(mode, size, value), "PNG" if mode != "CMYK" else "TIFF", **save)


@pytest.mark.parametrize(
    ("data", "rgb"),
    [
        (single("L", 77), (77, 77, 77)),
        (single("1", 1), (255, 255, 255)),
        (single("RGBA", (0, 0, 255, 0)), PAD),  # fully transparent: the pad colour
        (single("RGBA", (0, 0, 255, 255)), (0, 0, 255)),
        (single("LA", (0, 0)), PAD),
        (single("LA", (90, 255)), (90, 90, 90)),
        (single("CMYK", (0, 0, 0, 0)), (255, 255, 255)),
        (single("CMYK", (0, 255, 255, 0)), (255, 0, 0)),
        (single("I;16", 65535), (255, 255, 255)),  # 16-bit scaled, not clipped
        (single("I;16", 32896), (128, 128, 128)),
        (single("I;16", 257 * 40), (40, 40, 40)),
    ],
    ids=["L", "1", "RGBA-clear", "RGBA-opaque", "LA-clear", "LA-opaque", "CMYK-white", "CMYK-red",
         "I16-max", "I16-half", "I16-40"],
)
def test_colour_modes(data, rgb):
    assert (np.asarray(decode_rgb(data, PAD)) == rgb).all()


def test_palette_with_transparency_and_first_frame_of_an_animation():
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 250, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    decoded = np.asarray(decode_rgb(encode(palette, "PNG", transparency=0), PAD))
    assert tuple(decoded[0, 0]) == PAD and tuple(decoded[1, 1]) == (250, 0, 0)

    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 255, 0)]]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert tuple(np.asarray(decode_rgb(gif))[4, 4]) == (255, 0, 0)


def test_preprocess_is_decode_then_letterbox():
    data = encode(marker(), "PNG")
    pixels, geometry = preprocess(data, 64, PAD, "lanczos")
    expected, _ = letterbox(marker(), 64, PAD, "lanczos")
    assert np.array_equal(pixels, expected)
    assert (geometry.original_width, geometry.original_height) == (40, 20)
