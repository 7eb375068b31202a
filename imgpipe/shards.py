"""The download stage's output: images in tar shards (WebDataset's layout), placed by content hash.

``OUT/images-00003-of-00016.tar`` holds, for each image whose sha256 falls in that shard's range,
sorted by sha256::

    <sha256>.<ext>    the validated bytes as fetched (the extension names the decoded format)
    <sha256>.json     {"label", "url", "format", "width", "height"}: the kept row and what decoding saw

Why tar: a shard is a plain archive that ``tar tf`` lists and ``tar xf`` unpacks without this
project, WebDataset and most data loaders read it as it is, and it streams (one pass, no index
needed). Parquet would need pyarrow and hides the files. Headers are fixed (mtime 0, uid/gid 0,
mode 0644, no user names), so a shard's bytes depend only on its images.

The shard of an image is the top bits of its sha256, and the number of shards is the power of
two that keeps them at most ``shard_size`` images (so between half and all of it, on average):
equal bytes always land in the same shard, a shard's contents never depend on timing or on how
many machines ran, and adding images rewrites only the shards they fall in until the count doubles.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from imgpipe.errors import StageError
from imgpipe.images import EXTENSIONS

SHARD_NAME = re.compile(r"^images-(\d{5})-of-(\d{5})\.tar$")
DIGEST_BITS = 32  # sha256 bits used to place an image: up to 2**32 shards
IMAGE_MEMBER = re.compile(rf"^([0-9a-f]{{64}})\.({'|'.join(sorted(set(EXTENSIONS.values())))})$")


@dataclass(frozen=True)
class ImageMeta:
    """What the download stage knows of one kept image, stored beside it as ``<sha256>.json``."""

    label: str
    url: str  # the manifest row (or file) that was kept
    format: str  # as Pillow decoded it: JPEG, PNG, ...
    width: int
    height: int


def shard_count(images: int, shard_size: int) -> int:
    """The smallest power of two that leaves no more than ``shard_size`` images per shard on average."""
    count = 1
    while count * shard_size < images:
        count *= 2
    return count


def shard_of(digest: str, count: int) -> int:
    """The shard (of ``count``, a power of two) that an image with this sha256 belongs to."""
    bits = count.bit_length() - 1
    return int(digest[:DIGEST_BITS // 4], 16) >> (DIGEST_BITS - bits) if bits else 0


def shard_name(index: int, count: int) -> str:
    return f"images-{index:05d}-of-{count:05d}.tar"


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Appends images to one open shard file (the caller writes it somewhere atomic)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.images = 0
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    def add(self, digest: str, extension: str, data: bytes, meta: ImageMeta) -> None:
        text = json.dumps(asdict(meta), sort_keys=True, ensure_ascii=False).encode("utf-8")
        self._tar.addfile(_member(f"{digest}.{extension}", len(data)), io.BytesIO(data))
        self._tar.addfile(_member(f"{digest}.json", len(text)), io.BytesIO(text))
        self.images += 1

    def close(self) -> None:
        self._tar.close()


@dataclass(frozen=True)
class StoredImage:
    """Where one image's bytes lie in a shard, and its metadata: read without loading the bytes."""

    shard: Path
    digest: str
    extension: str
    offset: int  # of the image's bytes in the shard file
    size: int
    meta: ImageMeta

    def read(self) -> bytes:
        with self.shard.open("rb") as handle:
            handle.seek(self.offset)
            return handle.read(self.size)


def index_shard(path: Path) -> Iterator[StoredImage]:
    """Every image of one shard, in stored (sha256) order, with its metadata; the image bytes
    are skipped, not read. A member this stage would not have written is an error."""
    try:
        with tarfile.open(path, "r:") as tar:
            pending: tuple[str, str, int, int] | None = None
            for info in tar:
                image = IMAGE_MEMBER.match(info.name)
                if image and info.isfile() and pending is None:
                    pending = (image[1], image[2], info.offset_data, info.size)
                    continue
                if pending and info.isfile() and info.name == f"{pending[0]}.json":
                    handle = tar.extractfile(info)
                    assert handle is not None
                    meta = ImageMeta(**json.loads(handle.read()))
                    yield StoredImage(path, pending[0], pending[1], pending[2], pending[3], meta)
                    pending = None
                    continue
                raise StageError(f"{path}: unexpected member {info.name!r} (not written by the download stage)")
            if pending:
                raise StageError(f"{path}: {pending[0]}.{pending[1]} has no metadata ({pending[0]}.json)")
    except (tarfile.TarError, OSError, ValueError, TypeError) as exc:
        raise StageError(f"{path}: not a readable image shard ({exc})") from None


def list_shards(folder: Path) -> list[Path]:
    """The shards of a download output, in order; anything else in the folder is an error."""
    if not folder.is_dir():
        raise StageError(f"{folder} is not a folder of image shards")
    paths = sorted(folder.iterdir())
    counts = set()
    for path in paths:
        match = SHARD_NAME.match(path.name)
        if not match or not path.is_file():
            raise StageError(f"{folder} holds {path.name}, which is not an image shard "
                             "(expected images-NNNNN-of-NNNNN.tar from the download stage)")
        counts.add(int(match[2]))
    if not paths:
        raise StageError(f"{folder} holds no image shards (run the download stage first)")
    if len(counts) > 1 or len(paths) != counts.pop():
        raise StageError(f"{folder} holds an incomplete set of shards ({len(paths)} files)")
    return paths


def iter_images(folder: Path) -> Iterator[StoredImage]:
    """Every image of a download output, shard by shard, in sha256 order."""
    for path in list_shards(folder):
        yield from index_shard(path)
