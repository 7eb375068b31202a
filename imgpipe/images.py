"""The one place preprocessing lives: bytes -> upright RGB -> letterboxed square, pure Pillow/NumPy.

The pack stage writes exactly what :func:`preprocess` returns into the TFRecords, and the
prediction service calls the same function on every request, so what the model saw in
training is, byte for byte, what it sees in production. No TensorFlow here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# The image formats the pipeline reads (Pillow's names) and the extension a kept file gets: the
# download stage keeps these (download.formats chooses among them), the service accepts these.
EXTENSIONS = {"BMP": "bmp", "GIF": "gif", "JPEG": "jpg", "PNG": "png", "TIFF": "tiff", "WEBP": "webp"}
FORMATS = tuple(EXTENSIONS)
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class Geometry:
    """Where the original image sits in the square: ``square = original * scale + offset``."""

    original_width: int
    original_height: int
    scale: float
    offset_x: int
    offset_y: int
    width: int  # of the resized image inside the square
    height: int

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        """Map a point of the square (e.g. a class-activation peak) back onto the original."""
        return (x - self.offset_x) / self.scale, (y - self.offset_y) / self.scale


def _to_rgb(image: Image.Image, pad_color: tuple[int, int, int]) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT:
        # 16-bit samples scaled to 8 bits (not clipped: 65535 -> 255, 32768 -> 128).
        wide = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        return Image.fromarray(np.clip(np.round(np.asarray(image)), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "P":
        mode = "RGBA" if "transparency" in image.info else "RGB"
        image = image.convert(mode)
    if mode in {"LA", "PA", "La", "RGBa"}:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        # Transparent areas become the pad colour, so they look like the padding around them.
        background = Image.new("RGB", image.size, pad_color)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_rgb(data: bytes, pad_color: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Decode the first frame, upright per its EXIF orientation, as 8-bit RGB."""
    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)
        upright = ImageOps.exif_transpose(image)
        upright.load()
        return _to_rgb(upright, pad_color)


def letterbox(image: Image.Image, size: int, pad_color: tuple[int, int, int] = (0, 0, 0),
              resample: str = "bilinear") -> tuple[np.ndarray, Geometry]:
    """Resize so the longer side is ``size``, keep the aspect ratio, centre on a padded square."""
    width, height = image.size
    scale = size / max(width, height)
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    resized = image.resize((new_width, new_height), RESAMPLE[resample]) if (new_width, new_height) != image.size \
        else image
    offset_x, offset_y = (size - new_width) // 2, (size - new_height) // 2
    square = Image.new("RGB", (size, size), pad_color)
    square.paste(resized, (offset_x, offset_y))
    geometry = Geometry(width, height, scale, offset_x, offset_y, new_width, new_height)
    return np.asarray(square, dtype=np.uint8), geometry


def preprocess(data: bytes, size: int, pad_color: tuple[int, int, int] = (0, 0, 0),
               resample: str = "bilinear") -> tuple[np.ndarray, Geometry]:
    """Image file bytes -> (``size`` x ``size`` x 3 uint8 array, geometry). Raises on bad bytes."""
    return letterbox(decode_rgb(data, pad_color), size, pad_color, resample)
