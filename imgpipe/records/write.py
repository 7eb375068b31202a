"""Packing: the download stage's image shards -> letterboxed, sharded TFRecords with a fixed split.

Each image goes to train, val or test by a hash of (seed, its content's sha256): the split never
depends on order or on the other images, so adding images never moves an existing one, and the
same content can never be in two splits. (One exception, for tiny classes: a split that hashing
leaves empty for a class gets the image nearest its share, which returns to its own split once
the class grows enough not to need it.) Val chooses (epochs, trials, the served model); test
chooses nothing and is evaluated once, at the end.

Pixels come from ``imgpipe.images.preprocess``, the function the prediction service uses too,
and are stored as lossless PNG. ``imgpipe.records.read`` reads the shards back.

Where the work runs: letterboxing is a task on ``imgpipe.distribute`` (worker processes here,
or Ray). This process holds every image's metadata (``StoredImage``: label, sha256, where its
bytes lie in which shard), never all the bytes: it reads each batch's bytes from the shards in
record order and sends them with the task (Ray's workers may be machines without the files), at
most the distributor's tasks in flight. Results come back in order and only this process writes
the records, with TensorFlow; workers never import it. The sha256 comes from the shard (its
member name); each task checks it against the bytes, a hash per image beside a decode.

``skipped.csv`` (``path,label,reason``) names a skipped image as ``<shard file name>/<sha256>.<ext>``,
its member in that shard (``tar xf`` the shard to look at it).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from imgpipe.distribute import Distributor
from imgpipe.errors import StageError
from imgpipe.files import replacing_folder, sha256, write_csv_atomic, write_text_atomic
from imgpipe.images import preprocess
from imgpipe.params import PackParams
from imgpipe.shards import StoredImage, index_shard, list_shards

SPLITS = ("train", "val", "test")
# Images per task: enough that a task's own cost (milliseconds on Ray) is small beside decoding
# them, few enough that every core gets tasks on a small data set.
BATCH_IMAGES = 32
# Encoded bytes per task at most, so that tasks in flight stay small for photo-sized images too.
BATCH_BYTES = 16 * 2**20
PRELOAD = ("imgpipe.records.write",)  # what worker processes import once: the task's module, no TensorFlow

Skipped = tuple[str, str, str]  # (path, label, reason): one row of skipped.csv
Letterboxing = tuple[int, tuple[int, int, int], str]  # (size, pad_color, resample): what every task is told
TaskImage = tuple[str, str, bytes]  # (member path, sha256, bytes): one image as a task receives it


@dataclass(frozen=True)
class Packed:
    png: bytes
    original_width: int
    original_height: int


def member_path(image: StoredImage) -> str:
    """How skipped.csv and errors name an image: ``<shard file name>/<sha256>.<ext>``."""
    return f"{image.shard.name}/{image.digest}.{image.extension}"


def index_images(folder: Path) -> list[StoredImage]:
    """Every image of the download output ``folder`` (metadata only: the bytes stay in the
    shards), one per (label, content), sorted by (label, sha256); two classes at least."""
    try:
        shards = list_shards(folder)
    except StageError as exc:  # the folder is missing, empty, or not the download stage's (class folders)
        raise StageError(f"--images {exc}") from None
    found = {(image.meta.label, image.digest): image for shard in shards for image in index_shard(shard)}
    labels = sorted({label for label, _ in found})
    if len(labels) < 2:
        raise StageError(f"--images {folder} has a single class ({labels[0]!r}); a classifier needs two or more")
    return [found[key] for key in sorted(found)]


def uniform(seed: int, digest: str) -> float:
    """A number in [0, 1) fixed by the seed and the content alone."""
    return int(hashlib.sha256(f"{seed}:{digest}".encode()).hexdigest()[:16], 16) / 2**64


def split_bounds(val_fraction: float, test_fraction: float) -> dict[str, tuple[float, float]]:
    """Each split's share of [0, 1): test first, then val, then train."""
    return {"test": (0.0, test_fraction), "val": (test_fraction, test_fraction + val_fraction),
            "train": (test_fraction + val_fraction, 1.0)}


def _distance(u: float, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return 0.0 if low <= u < high else min(abs(u - low), abs(u - high))


def assign_splits(images: Iterable[tuple[str, str]], seed: int, val_fraction: float,
                  test_fraction: float) -> dict[str, str]:
    """(label, sha256) pairs -> {sha256: split}. Each image falls in the split whose share of [0, 1) holds its hash.

    A class of three or more images gets at least one in every split (of two: one in train and
    one in val): when hashing leaves a split empty, the image nearest that split's share crosses
    over from a split that can spare it. Only tiny classes ever need this, and an image that
    crossed returns once its class is big enough."""
    bounds = split_bounds(val_fraction, test_fraction)
    by_class: dict[str, set[str]] = defaultdict(set)
    for label, digest in images:
        by_class[label].add(digest)
    position = {digest: uniform(seed, digest) for digests in by_class.values() for digest in digests}
    split = {digest: next(name for name, (low, high) in bounds.items() if low <= u < high)
             for digest, u in position.items()}
    for digests in by_class.values():
        needed = SPLITS if len(digests) >= 3 else ("train", "val") if len(digests) == 2 else ()
        for name in needed:
            held = Counter(split[d] for d in digests)
            if held[name]:
                continue
            # A donor's split either is not needed or keeps another image.
            donors = sorted(d for d in digests if split[d] not in needed or held[split[d]] > 1)
            split[min(donors, key=lambda d: (_distance(position[d], bounds[name]), d))] = name
    return split


def pack_one(data: bytes, size: int, pad_color: tuple[int, int, int], resample: str) -> Packed | str:
    """Preprocess and PNG-encode one image; a string says why it was skipped."""
    try:
        pixels, geometry = preprocess(data, size, pad_color, resample)
    except Exception as exc:  # any unreadable image is skipped with its reason, never a crash
        # Pillow names the in-memory file by its address ("<_io.BytesIO object at 0x7f...>"): cut it,
        # so skipped.csv holds the same bytes on every run.
        reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", f"{type(exc).__name__}: {exc}")
        return reason.splitlines()[0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)  # fixed settings: same bytes every run
    return Packed(buffer.getvalue(), geometry.original_width, geometry.original_height)


def pack_batch(images: list[TaskImage], letterboxing: Letterboxing) -> list[Packed | str]:
    """The task: each image's PNG (or why it was skipped), in order. Runs on a worker: bytes in,
    bytes out, no file touched."""
    packed = []
    for path, digest, data in images:
        # The sha256 becomes the record's identity and split key: a damaged shard must not pass.
        if sha256(data) != digest:
            raise StageError(f"{path}: the bytes do not match their sha256 (a damaged shard: "
                             "rerun the download stage)")
        packed.append(pack_one(data, *letterboxing))
    return packed


def batches(images: Iterable[StoredImage]) -> Iterator[list[StoredImage]]:
    """Consecutive images, ``BATCH_IMAGES`` or ``BATCH_BYTES`` at most (a larger image alone)."""
    batch: list[StoredImage] = []
    size = 0
    for image in images:
        if batch and (len(batch) == BATCH_IMAGES or size + image.size > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(image)
        size += image.size
    if batch:
        yield batch


def example(tf, label: str, digest: str, packed: Packed, label_index: int, size: int) -> bytes:  # type: ignore[no-untyped-def]
    def bytes_feature(value: bytes):  # type: ignore[no-untyped-def]
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def int_feature(value: int):  # type: ignore[no-untyped-def]
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    features = {
        "image/encoded": bytes_feature(packed.png),
        "image/format": bytes_feature(b"png"),
        "image/height": int_feature(size),
        "image/width": int_feature(size),
        "image/class/label": int_feature(label_index),
        "image/class/text": bytes_feature(label.encode()),
        "image/sha256": bytes_feature(digest.encode()),
        "image/original/height": int_feature(packed.original_height),
        "image/original/width": int_feature(packed.original_width),
    }
    # deterministic=True sorts the feature map, so the record bytes never vary between runs.
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


def shard_names(split: str, count: int, shard_size: int) -> list[str]:
    shards = max(1, -(-count // shard_size))
    return [f"{split}-{i:05d}-of-{shards:05d}.tfrecord" for i in range(shards)]


def pack(images: list[StoredImage], out: Path, p: PackParams, engine: Distributor) -> tuple[dict, list[Skipped]]:
    """Pack ``images`` (from :func:`index_images`) into the TFRecords folder ``out``, letterboxing
    on ``engine``; returns the report (images per split and class, skipped, shards) and the
    skipped images."""
    labels = sorted({image.meta.label for image in images})
    split = assign_splits(((image.meta.label, image.digest) for image in images), p.seed, p.val_fraction,
                          p.test_fraction)
    # Records in a content-hash order: shards mix the classes, and the order never moves.
    ordered = {name: sorted((image for image in images if split[image.digest] == name),
                            key=lambda image: uniform(p.seed + 1, image.digest)) for name in SPLITS}
    work = [image for name in SPLITS for image in ordered[name]]
    letterboxing: Letterboxing = (p.image_size, tuple(p.pad_color), p.resample)
    # A generator: each batch's bytes are read only when the distributor has room for its task.
    tasks = (([(member_path(image), image.digest, image.read()) for image in batch], letterboxing)
             for batch in batches(work))
    results = (packed for batch in engine.map(pack_batch, tasks) for packed in batch)
    skipped, counts = write_records(out, ordered, results, labels, p, len(work))

    report = {
        "images": {name: sum(c[name] for c in counts.values()) for name in SPLITS},
        "skipped": len(skipped),
        "classes": len(labels),
        "per_class": {label: {name: counts[label][name] for name in SPLITS} for label in labels},
        "shards": {name: len(shard_names(name, len(ordered[name]), p.shard_size)) for name in SPLITS},
    }
    return report, skipped


def write_report(path: Path, report: dict, skipped: list[Skipped]) -> None:
    """The metrics JSON at ``path`` and ``skipped.csv`` beside it."""
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    write_csv_atomic(path.with_name("skipped.csv"), ["path", "label", "reason"], sorted(skipped))


def write_records(out: Path, ordered: dict[str, list[StoredImage]], results: Iterator[Packed | str],
                  labels: list[str], p: PackParams, total: int) -> tuple[list[Skipped], dict[str, Counter]]:
    """Write every shard into a staging folder that becomes ``out`` whole (``replacing_folder``)."""
    import tensorflow as tf  # only this process writes records; workers never import TensorFlow

    index = {label: i for i, label in enumerate(labels)}
    skipped: list[Skipped] = []
    counts: dict[str, Counter] = defaultdict(Counter)
    with replacing_folder(out) as staging:
        with tqdm(total=total, desc="pack", unit="img", mininterval=0.5, disable=None) as bar:
            for name in SPLITS:
                images = ordered[name]
                for shard_index, shard in enumerate(shard_names(name, len(images), p.shard_size)):
                    with tf.io.TFRecordWriter(str(staging / shard)) as records:
                        for image in images[shard_index * p.shard_size:(shard_index + 1) * p.shard_size]:
                            packed = next(results)
                            bar.update()
                            label = image.meta.label
                            if isinstance(packed, str):
                                skipped.append((member_path(image), label, packed))
                                continue
                            records.write(example(tf, label, image.digest, packed, index[label], p.image_size))
                            counts[label][name] += 1
        (staging / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    return skipped, counts
