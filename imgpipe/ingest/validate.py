"""Validator: keep bytes only if Pillow fully decodes them as an allowed, sane image.

The Content-Type header and the file extension are never consulted: a page of HTML served as
``image/jpeg`` or a text file named ``.jpg`` is judged by its bytes alone.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from imgpipe.images import EXTENSIONS
from imgpipe.ingest.drops import Drop

# Extension written for each decoded format: the output name says what the bytes are.


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    mode: str

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


def _sniff(data: bytes) -> str:
    head = data[:256].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    if head.startswith(b"<?xml") or b"<svg" in head:
        return "XML/SVG text"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in data[:512]):
        return "plain text"
    return "unrecognised bytes"


def inspect(data: bytes, formats: list[str], max_pixels: int, min_side: int) -> ImageInfo:
    """Decode ``data`` completely (first frame of an animation) or raise ``Drop``."""
    if not data:
        raise Drop("empty", "0 bytes")
    with warnings.catch_warnings():
        # Pillow warns about big images; our own max_pixels check decides, before any decoding.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise Drop("too_many_pixels", re.sub(r",?\s*could be.*$", "", str(exc))) from None
        except UnidentifiedImageError:
            raise Drop("not_an_image", f"Pillow cannot identify it ({_sniff(data)}, {len(data)} bytes)") from None
        except Exception as exc:  # Pillow raises many types on malformed headers
            raise Drop("decode_error", f"unreadable header ({type(exc).__name__}: {exc})") from None
        with image:
            width, height = image.size
            if image.format not in formats:
                raise Drop("unsupported_format", f"{image.format} is not in download.formats {formats}")
            pixels = width * height
            if pixels > max_pixels:
                raise Drop("too_many_pixels", f"{width}x{height} = {pixels} pixels > download.max_pixels {max_pixels}")
            if min(width, height) < min_side:
                raise Drop("too_small", f"{width}x{height}: shorter side < download.min_side {min_side}")
            try:
                image.load()  # the whole first frame, not just the header (verify() does not decode)
            except Exception as exc:
                raise Drop("decode_error", f"{image.format} does not decode: {exc}") from None
            return ImageInfo(image.format, width, height, image.mode)
