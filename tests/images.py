"""Image bytes for tests: every mode and format the stages must handle, and the broken ones."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def rgb_png(seed: int = 0, size: tuple[int, int] = (48, 40)) -> bytes:
    return encode(noise(*size, seed=seed), "PNG")


def rgb_jpeg(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    return encode(noise(*size, seed=seed), "JPEG", quality=90)


def gray_png(seed: int = 0) -> bytes:
    return encode(noise(40, 56, seed=seed, mode="L"), "PNG")


def cmyk_jpeg(seed: int = 0) -> bytes:
    return encode(noise(50, 50, seed=seed).convert("CMYK"), "JPEG", quality=90)


def png16(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 65536, size=(36, 44), dtype=np.uint16)
    image = Image.fromarray(pixels)
    assert image.mode == "I;16", image.mode
    return encode(image, "PNG")


def palette_png_transparent(seed: int = 0) -> bytes:
    image = noise(40, 40, seed=seed).quantize(16)
    return encode(image, "PNG", transparency=0)


def webp(seed: int = 0) -> bytes:
    return encode(noise(40, 40, seed=seed), "WEBP", lossless=True)


def animated_gif(seed: int = 0) -> bytes:
    frames = [noise(40, 40, seed=seed + i).quantize(32) for i in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def truncated_jpeg(seed: int = 0) -> bytes:
    data = rgb_jpeg(seed, size=(160, 160))
    return data[: len(data) * 2 // 3]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` (1-bit) but carries almost no data: a bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


SVG = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
       b'<rect width="64" height="64"/></svg>')
HTML = b"<!DOCTYPE html><html><body>Image not found</body></html>"
