"""Reading packed TFRecords for training: a fast, deterministic ``tf.data`` pipeline.

    dataset = make_dataset("build/tfrecords", "train", batch_size=32, image_size=224, seed=42,
                           augment=params.augment)

Shards are read in parallel and interleaved, records parsed and PNG-decoded in parallel, then
(for training) shuffled with a seed, augmented in the graph with stateless random ops, batched
and prefetched. The same seed gives the same batches, epoch after epoch. Images come out as
float32 in [0, 255] exactly as ``imgpipe.images.preprocess`` made them: scaling is the model's.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow as tf

from imgpipe.params import AugmentParams

FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}
AUTOTUNE = tf.data.AUTOTUNE


class DatasetError(Exception):
    """The TFRecords cannot be read; the message names the file."""


def shard_files(folder: Path | str, split: str) -> list[str]:
    files = sorted(str(p) for p in Path(folder).glob(f"{split}-*-of-*.tfrecord"))
    if not files:
        raise DatasetError(f"no {split}-*.tfrecord shards in {folder}; run the pack stage first")
    return files


def count_records(files: list[str]) -> int:
    """Read every shard once, checking each record's checksum: a corrupt or truncated file is
    reported by name before training starts, not as an anonymous error mid-epoch."""
    total = 0
    for path in files:
        try:
            total += sum(1 for _ in tf.data.TFRecordDataset(path, buffer_size=1 << 20))
        except (tf.errors.DataLossError, tf.errors.OutOfRangeError, tf.errors.InvalidArgumentError) as exc:
            raise DatasetError(f"{path}: corrupt or truncated TFRecord ({exc.message.splitlines()[0]})") from None
    return total


def label_counts(folder: Path | str, split: str, classes: int) -> list[int]:
    """Images per class index in a split, from the labels alone (no image decoding)."""
    return np.bincount(split_labels(folder, split), minlength=classes).tolist()


def split_labels(folder: Path | str, split: str) -> np.ndarray:
    """Every record's label in a split, in file order (shards by name, records as written), from
    the labels alone (no image decoded): what ``balanced_sample`` chooses from. Reading checks
    every record's checksum, so a damaged shard is a DatasetError naming it."""
    parts = [np.zeros(0, np.int64)]
    for path in shard_files(folder, split):
        labels = tf.data.TFRecordDataset(path, buffer_size=1 << 20).map(
            lambda record: tf.io.parse_single_example(record, {"image/class/label": FEATURES["image/class/label"]})
            ["image/class/label"], num_parallel_calls=AUTOTUNE, deterministic=True)
        try:
            parts.extend(batch.numpy() for batch in labels.batch(4096))
        except (tf.errors.DataLossError, tf.errors.OutOfRangeError, tf.errors.InvalidArgumentError) as exc:
            raise DatasetError(f"{path}: corrupt or truncated TFRecord ({exc.message.splitlines()[0]})") from None
    return np.concatenate(parts)


def class_quotas(counts: list[int], limit: int) -> list[int]:
    """How many images of each class a sample of at most ``limit`` takes: an equal share each,
    and a class with fewer images than its share gives what it cannot fill to the others.

    Classes are served from the smallest up, each taking its equal share of what is left, so the
    leftover of a small class flows to the larger ones (the remainder of the division goes to
    the largest)."""
    quotas = [0] * len(counts)
    left = min(limit, sum(counts))
    order = sorted(range(len(counts)), key=lambda c: (counts[c], c))
    for served, c in enumerate(order):
        quotas[c] = min(counts[c], left // (len(order) - served))
        left -= quotas[c]
    return quotas


def balanced_sample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Ascending positions of a seeded, class-balanced sample of at most ``limit`` of ``labels``
    (``class_quotas`` per class, each class's images drawn without replacement by
    ``numpy.random.default_rng(seed)``); every position when there are no more than ``limit``.
    The same labels, limit and seed give the same sample."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    counts = np.bincount(labels).tolist()
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), quota, replace=False)
              for c, quota in enumerate(class_quotas(counts, limit))]
    return np.sort(np.concatenate(chosen))


def load_records_at(folder: Path | str, split: str, image_size: int,
                    positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The records at ``positions`` (file order, as ``split_labels`` numbers them) in memory:
    (uint8 images, int64 labels), in ascending position order. One pass over the split's
    records that decodes only the chosen ones into arrays allocated once: memory is the sample's,
    whatever the split's size."""
    positions = np.unique(np.asarray(positions, np.int64))
    images = np.empty((len(positions), image_size, image_size, 3), np.uint8)
    labels = np.empty(len(positions), np.int64)
    if not len(positions):
        return images, labels
    keep = np.zeros(int(positions[-1]) + 1, bool)
    keep[positions] = True
    wanted = tf.constant(keep)
    chosen = (tf.data.TFRecordDataset(shard_files(folder, split), buffer_size=1 << 20).take(len(keep)).enumerate()
              .filter(lambda position, _: wanted[position])
              .map(lambda _, record: parse(record, image_size), num_parallel_calls=AUTOTUNE, deterministic=True)
              .batch(256).prefetch(1))
    filled = 0
    for batch, truth in chosen:
        images[filled:filled + len(batch)] = batch.numpy()
        labels[filled:filled + len(batch)] = truth.numpy()
        filled += len(batch)
    if filled != len(positions):
        raise DatasetError(f"{split} records in {folder}: {len(positions)} chosen, {filled} found")
    return images, labels


def record_image_size(folder: Path | str) -> int:
    """The side of the packed images, read from the first training record."""
    path = shard_files(folder, "train")[0]
    try:
        first = next(iter(tf.data.TFRecordDataset(path).take(1)))
        feature = {"image/height": tf.io.FixedLenFeature([], tf.int64)}
        return int(tf.io.parse_single_example(first, feature)["image/height"])
    except (StopIteration, tf.errors.OpError) as exc:
        raise DatasetError(f"{path}: no readable first record ({type(exc).__name__})") from None


def parse(serialized: tf.Tensor, image_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """One record -> (uint8 image, label); the cast to float32 happens once per batch."""
    record = tf.io.parse_single_example(serialized, FEATURES)
    image = tf.io.decode_png(record["image/encoded"], channels=3)
    return tf.ensure_shape(image, [image_size, image_size, 3]), record["image/class/label"]


def to_float(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    return tf.cast(images, tf.float32), labels


def rotate(image: tf.Tensor, turns: tf.Tensor) -> tf.Tensor:
    """Rotate about the centre by ``turns`` of a full turn, edges extended (they are padding)."""
    angle = turns * 2.0 * math.pi
    height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    cos, sin = tf.cos(angle), tf.sin(angle)
    x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2.0
    y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2.0
    transform = tf.stack([cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])[tf.newaxis]
    rotated = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[tf.newaxis], transforms=transform, output_shape=tf.shape(image)[:2],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="NEAREST")
    return rotated[0]


def augmenter(params: AugmentParams):
    """Per-image augmentation from a stateless seed: the same seed, the same picture."""

    def augment(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        seeds = tf.random.experimental.stateless_split(seed, num=3)
        image = tf.cast(image, tf.float32)
        if params.flip:
            image = tf.image.stateless_random_flip_left_right(image, seeds[0])
        if params.rotation > 0:
            turns = tf.random.stateless_uniform([], seeds[1], -params.rotation, params.rotation)
            image = rotate(image, turns)
        if params.contrast > 0:
            image = tf.image.stateless_random_contrast(image, 1 - params.contrast, 1 + params.contrast, seeds[2])
        # Back to uint8 (rounded) so augmented and plain images batch and cast alike.
        return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8), label

    return augment


def make_dataset(folder: Path | str, split: str, batch_size: int, image_size: int, seed: int = 0,
                 training: bool | None = None, augment: AugmentParams | None = None,
                 shuffle_buffer: int = 10_000, cache: bool = False, verify: bool = True) -> tf.data.Dataset:
    """Batches of (float32 images, int64 labels). ``training`` (default: split == "train")
    shuffles and applies ``augment``; otherwise the order is the shards' and nothing changes.

    ``cache`` keeps the decoded images in memory after the first pass (image_size^2 * 3 bytes
    each, plus as many again for the shuffle buffer), so later epochs skip PNG decoding, the
    pipeline's main cost. Without it, shuffling happens on the small encoded records.

    ``verify`` checks every record's checksum first (one quick pass), so a damaged shard stops
    here with its name (``DatasetError``) rather than in the middle of an epoch."""
    training = split == "train" if training is None else training
    files = shard_files(folder, split)
    total = count_records(files) if verify else None
    dataset = tf.data.Dataset.from_tensor_slices(files)
    if training and not cache:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.interleave(
        lambda path: tf.data.TFRecordDataset(path, buffer_size=1 << 20),
        cycle_length=min(len(files), 8), num_parallel_calls=AUTOTUNE, deterministic=True)
    if training and not cache:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed + 1, reshuffle_each_iteration=True)
    dataset = dataset.map(lambda record: parse(record, image_size), num_parallel_calls=AUTOTUNE, deterministic=True)
    if cache:
        dataset = dataset.cache()
        if training:
            dataset = dataset.shuffle(shuffle_buffer, seed=seed + 1, reshuffle_each_iteration=True)
    if training and augment is not None and (augment.flip or augment.rotation or augment.contrast):
        seeds = tf.data.Dataset.random(seed=seed + 2, rerandomize_each_iteration=True).batch(2)
        dataset = tf.data.Dataset.zip((dataset, seeds)).map(
            lambda example, pair: augmenter(augment)(*example, pair), num_parallel_calls=AUTOTUNE,
            deterministic=True)
    dataset = dataset.batch(batch_size, num_parallel_calls=AUTOTUNE, deterministic=True)
    if total is not None:  # a known length lets Keras plan epochs (and progress bars) exactly
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(-(-total // batch_size)))
    return dataset.map(to_float, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)


def epoch_seed(seed: int, epoch: int) -> int:
    """The data seed of one epoch (0-based): a function of (seed, epoch) alone, so an epoch's
    order and augmentation are the same whether or not the run was interrupted before it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:4], "big") >> 1


def training_epochs(folder: Path | str, batch_size: int, image_size: int, seed: int, first: int, epochs: int,
                    passes: int = 1, augment: AugmentParams | None = None) -> tf.data.Dataset:
    """The training split for epochs ``first`` .. ``epochs - 1`` (0-based), one after another,
    each ``passes`` shuffled passes long, for ``fit(steps_per_epoch=...)``.

    Each epoch is its own pipeline seeded by ``epoch_seed(seed, epoch)``, not a reshuffle drawn
    from the iterator's state: so an epoch's batches do not depend on the epochs before it, and a
    run resumed at epoch ``first`` sees exactly what an uninterrupted run saw. (With
    ``steps_per_epoch`` Keras keeps one iterator over all epochs, so the concatenation lines up.)
    The records' checksums are not verified again: the trainer's ``make_dataset`` did that."""
    if not 0 <= first < epochs:
        raise ValueError(f"first epoch {first} is not in [0, {epochs})")
    one = [make_dataset(folder, "train", batch_size, image_size, seed=epoch_seed(seed, epoch), training=True,
                        augment=augment, verify=False).repeat(passes) for epoch in range(first, epochs)]
    dataset = one[0]
    for more in one[1:]:
        dataset = dataset.concatenate(more)
    return dataset


def load_arrays(folder: Path | str, split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A whole split in memory, in ``make_dataset``'s evaluation order: (uint8 images, int64 labels).

    For tests and benchmarks that want arrays; the stages stream (``image_batches``) or sample
    (``load_records_at``) instead, so that their memory does not grow with the data."""
    batches = list(image_batches(folder, split, 256, image_size))
    return np.concatenate([images for images, _ in batches]), np.concatenate([labels for _, labels in batches])


def image_batches(folder: Path | str, split: str, batch_size: int, image_size: int,
                  verify: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A split a batch at a time, in ``make_dataset``'s evaluation order: (uint8 images, int64
    labels), the batches of ``load_arrays``' arrays, for steps whose memory must not grow with
    the data (one batch of pixels at a time, plus tf.data's prefetch). The shards are listed
    and verified here, so a missing or damaged split raises DatasetError before any batch."""
    return _uint8_batches(make_dataset(folder, split, batch_size, image_size, training=False, verify=verify))


def _uint8_batches(dataset: tf.data.Dataset) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for images, labels in dataset:
        yield images.numpy().astype(np.uint8), labels.numpy()  # exact: the float32 values are whole numbers


def first_images(folder: Path | str, split: str, count: int, image_size: int) -> np.ndarray:
    """The first ``count`` uint8 images of a split in evaluation order (all, if it holds fewer):
    ``load_arrays(...)[0][:count]``, reading no further than tf.data's read-ahead of a batch or
    two, not the rest of the split. Checksums are not verified first (that reads every shard);
    a damaged record among those read is a DatasetError."""
    try:
        images, _ = next(image_batches(folder, split, count, image_size, verify=False),
                         (np.zeros((0, image_size, image_size, 3), np.uint8), None))
    except tf.errors.OpError as exc:
        raise DatasetError(f"{split} records in {folder}: {exc.message.splitlines()[0]}") from None
    return images
