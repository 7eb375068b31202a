"""The /annotate picture: the original image at its own size, the attention heatmap over it (a
class activation map or an occlusion map, ``serve.attention``), a box around the hottest region
and the predicted label. NumPy and Pillow only.

The map is computed on the model's padded square, so it is cropped to where the image sits in
that square (``Geometry``) before being stretched back onto the original.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from imgpipe.images import Geometry

BOX_THRESHOLD = 0.5  # the box holds the peak's connected region at >= half the peak value
ALPHA = 0.45


def heat_colors(heat: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 on a blue-cyan-yellow-red ramp (jet-like, no matplotlib needed)."""
    x = heat[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255).astype(np.uint8)


def heatmap_on_original(cam: np.ndarray, geometry: Geometry, square_size: int) -> np.ndarray:
    """An h x w attention map over the square (any resolution) as a [0, 1] map the size of the original image."""
    cam = cam.astype(np.float32) - float(cam.min())
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else np.zeros_like(cam)
    square = Image.fromarray(cam, mode="F").resize((square_size, square_size), Image.Resampling.BILINEAR)
    box = (geometry.offset_x, geometry.offset_y, geometry.offset_x + geometry.width,
           geometry.offset_y + geometry.height)
    on_image = square.crop(box).resize((geometry.original_width, geometry.original_height),
                                       Image.Resampling.BILINEAR)
    return np.clip(np.asarray(on_image, dtype=np.float32), 0.0, 1.0)


def peak_region(heat: np.ndarray, threshold: float = BOX_THRESHOLD) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the connected region around the peak above ``threshold``."""
    from scipy import ndimage

    regions, _ = ndimage.label(heat >= threshold * float(heat.max()))
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    rows, cols = np.nonzero(regions == regions[peak])
    return int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())


def annotate(original: Image.Image, cam: np.ndarray, geometry: Geometry, square_size: int, label: str,
             confidence: float) -> bytes:
    """PNG bytes of the annotated original."""
    heat = heatmap_on_original(cam, geometry, square_size)
    base = np.asarray(original.convert("RGB"), dtype=np.float32)
    weight = ALPHA * heat[..., None]
    blended = Image.fromarray((base * (1 - weight) + heat_colors(heat) * weight).round().astype(np.uint8))
    draw = ImageDraw.Draw(blended)
    width = max(1, round(max(original.size) / 150))
    draw.rectangle(peak_region(heat), outline=(255, 0, 0), width=width)
    font = ImageFont.load_default(size=max(10, round(max(original.size) / 25)))
    text = f"{label} {confidence:.2f}"
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.rectangle((0, 0, right - left + 6, bottom - top + 6), fill=(0, 0, 0))
    draw.text((3 - left, 3 - top), text, fill=(255, 255, 255), font=font)
    buffer = io.BytesIO()
    blended.save(buffer, format="PNG")
    return buffer.getvalue()
