"""Packing: class folders of images -> letterboxed, sharded TFRecords with a fixed split.

Each image goes to train, val or test by a hash of (seed, its content's sha256): the split never
depends on order or on the other images, so adding images never moves an existing one, and the
same content can never be in two splits. (One exception, for tiny classes: a split that hashing
leaves empty for a class gets the image nearest its share, which returns to its own split once
the class grows enough not to need it.) Val chooses (epochs, trials, the served model); test
chooses nothing and is evaluated once, at the end.

Pixels come from ``imgpipe.images.preprocess``, the function the prediction service uses too,
and are stored as lossless PNG. ``imgpipe.records.read`` reads the shards back.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import multiprocessing
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from imgpipe.errors import StageError
from imgpipe.files import replacing_folder, write_csv_atomic, write_text_atomic
from imgpipe.images import preprocess
from imgpipe.params import PackParams

SPLITS = ("train", "val", "test")

Skipped = tuple[str, str, str]  # (path, label, reason): one row of skipped.csv


@dataclass(frozen=True)
class Source:
    label: str
    path: Path
    digest: str


@dataclass(frozen=True)
class Packed:
    png: bytes
    original_width: int
    original_height: int


def list_images(root: Path) -> list[tuple[str, Path]]:
    if not root.is_dir():
        raise StageError(f"--images {root} is not a folder")
    found = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
        found += [(class_dir.name, path) for path in files]
    if not found:
        raise StageError(f"--images {root} holds no images (expected {root}/<label>/<image>)")
    return found


def hash_file(item: tuple[str, Path]) -> Source:
    label, path = item
    return Source(label, path, hashlib.sha256(path.read_bytes()).hexdigest())


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


def assign_splits(sources: list[Source], seed: int, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """digest -> split. Each image falls in the split whose share of [0, 1) holds its hash.

    A class of three or more images gets at least one in every split (of two: one in train and
    one in val): when hashing leaves a split empty, the image nearest that split's share crosses
    over from a split that can spare it. Only tiny classes ever need this, and an image that
    crossed returns once its class is big enough."""
    bounds = split_bounds(val_fraction, test_fraction)
    position = {s.digest: uniform(seed, s.digest) for s in sources}
    split = {digest: next(name for name, (low, high) in bounds.items() if low <= u < high)
             for digest, u in position.items()}
    by_class: dict[str, set[str]] = defaultdict(set)
    for s in sources:
        by_class[s.label].add(s.digest)
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


def pack_one(source: Source, size: int, pad_color: tuple[int, int, int], resample: str) -> Packed | str:
    """Preprocess and PNG-encode one image; a string says why it was skipped."""
    try:
        pixels, geometry = preprocess(source.path.read_bytes(), size, pad_color, resample)
    except Exception as exc:  # any unreadable file is skipped with its reason, never a crash
        # Pillow names the in-memory file by its address ("<_io.BytesIO object at 0x7f...>"): cut it,
        # so skipped.csv holds the same bytes on every run.
        reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", f"{type(exc).__name__}: {exc}")
        return reason.splitlines()[0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)  # fixed settings: same bytes every run
    return Packed(buffer.getvalue(), geometry.original_width, geometry.original_height)


def example(tf, source: Source, packed: Packed, label_index: int, size: int) -> bytes:  # type: ignore[no-untyped-def]
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
        "image/class/text": bytes_feature(source.label.encode()),
        "image/sha256": bytes_feature(source.digest.encode()),
        "image/original/height": int_feature(packed.original_height),
        "image/original/width": int_feature(packed.original_width),
    }
    # deterministic=True sorts the feature map, so the record bytes never vary between runs.
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


def shard_names(split: str, count: int, shard_size: int) -> list[str]:
    shards = max(1, -(-count // shard_size))
    return [f"{split}-{i:05d}-of-{shards:05d}.tfrecord" for i in range(shards)]


def pack(images: Path, out: Path, p: PackParams) -> tuple[dict, list[Skipped]]:
    """Pack ``images`` (``<label>/<image>`` files) into the TFRecords folder ``out``; returns the
    report (images per split and class, skipped, shards) and the skipped images."""
    items = list_images(images)
    labels = sorted({label for label, _ in items})
    if len(labels) < 2:
        raise StageError(f"--images {images} has a single class ({labels[0]!r}); a classifier needs two or more")

    processes = p.processes or os.cpu_count() or 1
    context = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                          else "spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        sources = list(pool.map(hash_file, items, chunksize=64))
        # One copy per (label, content); the split is decided by content alone.
        sources = sorted({(s.label, s.digest): s for s in sources}.values(), key=lambda s: (s.label, s.digest))
        split = assign_splits(sources, p.seed, p.val_fraction, p.test_fraction)
        # Records in a content-hash order: shards mix the classes, and the order never moves.
        ordered = {name: sorted((s for s in sources if split[s.digest] == name),
                                key=lambda s: uniform(p.seed + 1, s.digest)) for name in SPLITS}
        work = [source for name in SPLITS for source in ordered[name]]
        pack_image = functools.partial(pack_one, size=p.image_size, pad_color=tuple(p.pad_color),
                                       resample=p.resample)
        results = pool.map(pack_image, work, chunksize=16)
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


def write_records(out: Path, ordered: dict[str, list[Source]], results: Iterator[Packed | str], labels: list[str],
                  p: PackParams, total: int) -> tuple[list[Skipped], dict[str, Counter]]:
    """Write every shard into a staging folder that becomes ``out`` whole (``replacing_folder``)."""
    import tensorflow as tf  # only the parent writes records; workers never import TensorFlow

    index = {label: i for i, label in enumerate(labels)}
    skipped: list[Skipped] = []
    counts: dict[str, Counter] = defaultdict(Counter)
    with replacing_folder(out) as staging:
        with tqdm(total=total, desc="pack", unit="img", mininterval=0.5, disable=None) as bar:
            for name in SPLITS:
                sources = ordered[name]
                for shard_index, shard in enumerate(shard_names(name, len(sources), p.shard_size)):
                    with tf.io.TFRecordWriter(str(staging / shard)) as records:
                        for source in sources[shard_index * p.shard_size:(shard_index + 1) * p.shard_size]:
                            packed = next(results)
                            bar.update()
                            if isinstance(packed, str):
                                skipped.append((source.path.as_posix(), source.label, packed))
                                continue
                            records.write(example(tf, source, packed, index[source.label], p.image_size))
                            counts[source.label][name] += 1
        (staging / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    return skipped, counts
