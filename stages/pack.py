"""Stage 2, pack: class folders of images -> letterboxed, sharded TFRecords with a fixed split.

    python -m stages.pack --images build/images --out build/tfrecords

Each image goes to train or val by a hash of (seed, its content's sha256): the split never
depends on order or on the other images, so adding images never moves an existing one, and the
same content can never be in both splits. (One exception, for tiny classes: when every image of
a class hashes to the same split, the one nearest the threshold is sent to the other, and it
returns to its own split once the class grows enough not to need it.)

Pixels come from ``imgpipe.images.preprocess``, the function the prediction service uses too,
and are stored as lossless PNG.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from imgpipe import params as params_module
from imgpipe.cli import StageError, run
from imgpipe.images import preprocess
from imgpipe.params import PackParams
from imgpipe.files import write_csv_atomic, write_text_atomic

NAME = "pack"
SPLITS = ("train", "val")


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


def assign_splits(sources: list[Source], seed: int, val_fraction: float) -> dict[str, str]:
    """digest -> split. A class of two or more images gets at least one image in each split:
    when hashing leaves a split empty, the image nearest the threshold crosses over (only tiny
    classes ever need this)."""
    split = {s.digest: "val" if uniform(seed, s.digest) < val_fraction else "train" for s in sources}
    by_class: dict[str, list[str]] = defaultdict(list)
    for s in sources:
        by_class[s.label].append(s.digest)
    for digests in by_class.values():
        digests = sorted(set(digests), key=lambda d: uniform(seed, d))
        if len(digests) < 2:
            continue
        if all(split[d] == "train" for d in digests):
            split[digests[0]] = "val"
        elif all(split[d] == "val" for d in digests):
            split[digests[-1]] = "train"
    return split


def pack_one(source: Source, size: int, pad_color: tuple[int, int, int], resample: str) -> Packed | str:
    """Preprocess and PNG-encode one image; a string says why it was skipped."""
    try:
        pixels, geometry = preprocess(source.path.read_bytes(), size, pad_color, resample)
    except Exception as exc:  # any unreadable file is skipped with its reason, never a crash
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)  # fixed settings: same bytes every run
    return Packed(buffer.getvalue(), geometry.original_width, geometry.original_height)


def example(tf, source: Source, packed: Packed, label_index: int, size: int) -> bytes:
    def bytes_feature(value: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def int_feature(value: int):
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m stages.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of <label>/<image> files")
    parser.add_argument("--out", type=Path, required=True, help="folder for TFRecord shards and labels.json")
    parser.add_argument("--report", type=Path, default=Path("reports/pack/metrics.json"),
                        help="metrics JSON; skipped.csv is written beside it (default: %(default)s)")
    params_module.add_section_flags(parser, NAME)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    p: PackParams = params_module.load_for(args, NAME).pack
    started = time.monotonic()
    items = list_images(args.images)
    labels = sorted({label for label, _ in items})
    if len(labels) < 2:
        raise StageError(f"--images {args.images} has a single class ({labels[0]!r}); a classifier needs two or more")

    processes = p.processes or os.cpu_count() or 1
    context = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                          else "spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        sources = list(pool.map(hash_file, items, chunksize=64))
        # One copy per (label, content); the split is decided by content alone.
        sources = sorted({(s.label, s.digest): s for s in sources}.values(), key=lambda s: (s.label, s.digest))
        split = assign_splits(sources, p.seed, p.val_fraction)
        # Records in a content-hash order: shards mix the classes, and the order never moves.
        ordered = {name: sorted((s for s in sources if split[s.digest] == name),
                                key=lambda s: uniform(p.seed + 1, s.digest)) for name in SPLITS}
        work = ordered["train"] + ordered["val"]
        pack = functools.partial(pack_one, size=p.image_size, pad_color=tuple(p.pad_color), resample=p.resample)
        results = pool.map(pack, work, chunksize=16)
        skipped, counts = write_records(args.out, ordered, results, labels, p, len(work))

    report = {
        "images": {name: sum(c[name] for c in counts.values()) for name in SPLITS},
        "skipped": len(skipped),
        "classes": len(labels),
        "per_class": {label: {name: counts[label][name] for name in SPLITS} for label in labels},
        "shards": {name: len(shard_names(name, len(ordered[name]), p.shard_size)) for name in SPLITS},
    }
    write_text_atomic(args.report, json.dumps(report, indent=2) + "\n")
    write_csv_atomic(args.report.with_name("skipped.csv"), ["path", "label", "reason"], sorted(skipped))

    seconds = time.monotonic() - started
    total = report["images"]["train"] + report["images"]["val"]
    print(f"{NAME}: {total} images ({report['images']['train']} train, {report['images']['val']} val) in "
          f"{len(labels)} classes at {p.image_size}x{p.image_size}, {len(skipped)} skipped; "
          f"{seconds:.1f} s, {total / seconds:.0f} images/s")


def write_records(out: Path, ordered: dict[str, list[Source]], results, labels: list[str], p: PackParams,
                  total: int) -> tuple[list[tuple[str, str, str]], dict[str, Counter]]:
    """Write every shard into a fresh folder beside ``out``, then swap it in whole."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep the log to what matters
    import tensorflow as tf  # only the parent writes records; workers never import TensorFlow

    index = {label: i for i, label in enumerate(labels)}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    skipped: list[tuple[str, str, str]] = []
    counts: dict[str, Counter] = defaultdict(Counter)
    try:
        with tqdm(total=total, desc=NAME, unit="img", mininterval=0.5, disable=None) as bar:
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
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return skipped, counts


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), NAME)
