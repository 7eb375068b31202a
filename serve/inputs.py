"""From a request to image bytes, and from bytes to the model's pixels, refusing bad input with
a named ``ApiError`` (never an exception from deep inside Pillow or the multipart parser)."""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from imgpipe.images import FORMATS, Geometry, decode_rgb, letterbox
from serve.errors import ApiError
from serve.remote import RemotePolicy, fetch

# What the download stage keeps; Pillow opens more (ICO, PSD, EPS...), the service does not take them.
MULTIPART, JSON = "multipart/form-data", "application/json"


class PredictJson(BaseModel):
    """JSON body: exactly one of ``image_base64``, ``url``, ``path``."""

    model_config = ConfigDict(extra="forbid")
    image_base64: str | None = Field(None, description="the image file's bytes, base64-encoded")
    url: str | None = Field(None, description="http(s) URL of an image (needs --allow-remote)")
    path: str | None = Field(None, description="file under the server's --path-root")
    top_k: int | None = Field(None, ge=1, description="answer only the k most likely labels")


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def unsupported(ctype: str) -> ApiError:
    return ApiError(415, "unsupported_media", f"content type {ctype or '(none)'!r} is not accepted: send "
                                              "multipart/form-data or application/json")


async def read_form(request: Request, max_bytes: int):  # type: ignore[no-untyped-def]
    try:
        return await request.form(max_files=256, max_fields=16, max_part_size=max_bytes)
    except HTTPException as exc:  # starlette's answer to a malformed body (400): a 422 here
        raise ApiError(422, "malformed_multipart", f"multipart body: {exc.detail}") from None


async def upload_bytes(value, field: str) -> bytes:  # type: ignore[no-untyped-def]
    if not isinstance(value, UploadFile):
        raise ApiError(422, "missing_field", f"multipart field {field!r} must be a file")
    return await value.read()


def parse_json(body: bytes) -> PredictJson:
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(422, "malformed_json", f"request body is not valid JSON ({exc})") from None
    try:
        request = PredictJson.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ApiError(422, "invalid_field", f"{where}: {first['msg']}") from None
    given = [name for name in ("image_base64", "url", "path") if getattr(request, name) is not None]
    if len(given) != 1:
        raise ApiError(422, "missing_field", "send exactly one of image_base64, url or path"
                       + (f" (got {', '.join(given)})" if given else ""))
    return request


def decode_base64(text: str, max_bytes: int) -> bytes:
    if len(text) > max_bytes * 4 // 3 + 4:
        raise ApiError(413, "too_large", f"image_base64 holds more than {max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(422, "malformed_base64", f"image_base64 is not valid base64 ({exc})") from None


def read_under_root(value: str, root: Path | None, max_bytes: int) -> bytes:
    """A server-side file, only inside ``--path-root``: the real path (symlinks and ``..``
    resolved) must stay under the root's real path."""
    if root is None:
        raise ApiError(403, "path_disabled", "reading server files is off; start the service with --path-root")
    if "\x00" in value:
        raise ApiError(422, "bad_path", "path holds a NUL byte")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, value))  # an absolute value replaces the root: checked below
    if os.path.commonpath([real_root, real]) != real_root:
        raise ApiError(403, "path_refused", f"path {value!r} is outside the served folder")
    if os.path.exists(real) and not os.path.isfile(real):  # a folder, a FIFO (whose open would block)...
        raise ApiError(422, "bad_path", f"path {value!r} is not a regular file")
    try:
        with open(real, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise ApiError(404, "not_found", f"path {value!r} does not exist under the served folder") from None
    except PermissionError:
        raise ApiError(403, "path_refused", f"path {value!r} cannot be read") from None
    if len(data) > max_bytes:
        raise ApiError(413, "too_large", f"path {value!r} is larger than {max_bytes} bytes")
    return data


def bytes_from_json(request: PredictJson, max_bytes: int, remote: RemotePolicy, root: Path | None) -> bytes:
    """Blocking (URL fetch, file read): run in a worker thread."""
    if request.image_base64 is not None:
        return decode_base64(request.image_base64, max_bytes)
    if request.url is not None:
        return fetch(request.url, remote)
    return read_under_root(request.path or "", root, max_bytes)


def check_image(data: bytes, max_pixels: int) -> None:
    """Refuse before decoding: empty, not an image, a format the service does not take, too many pixels."""
    if not data:
        raise ApiError(422, "not_an_image", "the image is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind, (width, height) = image.format, image.size
    except Image.DecompressionBombError as exc:
        raise ApiError(422, "too_many_pixels", str(exc)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ApiError(422, "not_an_image", "the bytes are not an image Pillow can read") from None
    if kind not in FORMATS:
        raise ApiError(415, "unsupported_media", f"{kind} images are not accepted (accepted: {', '.join(FORMATS)})")
    if width * height > max_pixels:
        raise ApiError(422, "too_many_pixels", f"{width}x{height} is more than {max_pixels} pixels")


def decode(data: bytes, size: int, pad_color: tuple[int, int, int], resample: str,
           max_pixels: int) -> tuple[Image.Image, np.ndarray, Geometry]:
    """Bytes -> (upright RGB original, model pixels, geometry) with the pack stage's own functions."""
    check_image(data, max_pixels)
    try:
        original = decode_rgb(data, pad_color)
    except Image.DecompressionBombError as exc:
        raise ApiError(422, "too_many_pixels", str(exc)) from None
    except Exception:  # noqa: BLE001 - truncated or corrupt data raises many kinds in Pillow's decoders
        raise ApiError(422, "not_an_image", "the image is truncated or corrupt") from None
    pixels, geometry = letterbox(original, size, pad_color, resample)
    return original, pixels, geometry
