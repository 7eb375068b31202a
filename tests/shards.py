"""Download outputs for tests: {label: [image bytes]} -> a folder of image shards, placed as the
download stage places them (``imgpipe.shards``: shard by the top bits of the sha256, sorted by
sha256 inside, every shard file present even when empty)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from PIL import Image

from imgpipe.images import EXTENSIONS
from imgpipe.shards import ImageMeta, ShardWriter, shard_count, shard_name, shard_of

SHARD_SIZE = 16  # small, so that a few dozen test images spread over several shards


def describe(data: bytes, label: str, url: str) -> tuple[str, ImageMeta]:
    """The extension and metadata the download stage stores with these bytes. Bytes Pillow
    cannot read (which the download stage never keeps) pass as a 0x0 JPEG: a damaged image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format or "JPEG", image.size
    except Exception:
        fmt, width, height = "JPEG", 0, 0
    return EXTENSIONS[fmt], ImageMeta(label=label, url=url, format=fmt, width=width, height=height)


def write_shards(folder: Path, images: dict[str, list[bytes]], shard_size: int = SHARD_SIZE) -> dict[str, bytes]:
    """Write ``images`` as the download stage's shards in ``folder``; returns sha256 -> bytes."""
    rows = sorted((hashlib.sha256(data).hexdigest(), label, i, data)
                  for label, datas in images.items() for i, data in enumerate(datas))
    count = shard_count(len(rows), shard_size)
    folder.mkdir(parents=True, exist_ok=True)
    writers = [ShardWriter(folder / shard_name(index, count)) for index in range(count)]
    for digest, label, i, data in rows:
        extension, meta = describe(data, label, f"images/{label}/{i:03d}")
        writers[shard_of(digest, count)].add(digest, extension, data, meta)
    for writer in writers:
        writer.close()
    return {digest: data for digest, _, _, data in rows}
