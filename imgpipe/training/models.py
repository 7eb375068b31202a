"""Shared pieces of the trainers: seeding for bit-identical runs, the ResNet50V2 model, class weights.

The model takes the padded image exactly as ``imgpipe.images`` makes it (float values in
[0, 255]) and scales it itself, so an exported model needs no arithmetic around it in serving.
"""

from __future__ import annotations

import random
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from imgpipe.errors import ParamsError

HEADS = ("auto", "softmax", "sigmoid")


def seed_everything(seed: int) -> None:
    """Same seed, same inputs, same machine: bit-identical weights (op determinism on).

    Also clears Keras' session, whose layer-name counters would otherwise give a second model
    built in the same process other names, and so another saved file."""
    keras.backend.clear_session()
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def strategy_for(name: str) -> tf.distribute.Strategy:
    """default: the current device; mirrored: every local GPU in sync (or, with no GPU, every
    logical CPU device, which is how it is tested); multi_worker: the machines in TF_CONFIG."""
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        return tf.distribute.MirroredStrategy([device.name for device in tf.config.list_logical_devices("CPU")])
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def resolve_head(head: str, classes: int) -> str:
    """``auto``: one sigmoid unit for exactly two classes (binary cross-entropy), else softmax."""
    if head not in HEADS:
        raise ValueError(f"train.head must be one of {HEADS}, not {head!r}")
    if head == "auto":
        return "sigmoid" if classes == 2 else "softmax"
    if head == "sigmoid" and classes != 2:
        raise ValueError(f"a sigmoid head needs exactly two classes, the data has {classes}")
    return head


def params_head(head: str, classes: int, params_files: list[Path]) -> str:
    """``resolve_head`` for ``train.head`` as read from ``params_files``: a head the data cannot
    have is a params error (exit code 2) naming those files, not a crash."""
    try:
        return resolve_head(head, classes)
    except ValueError as exc:
        raise ParamsError(f"{' + '.join(map(str, params_files))}: {exc}") from None


def build_resnet(image_size: int, classes: int, head: str = "auto", dropout: float = 0.0) -> keras.Model:
    """ResNet50V2 from scratch (weights=None: nothing is downloaded), global pooling, new head.

    Layer names are part of the contract with the export stage: ``features`` is the last
    convolutional feature map, ``pool`` the global average, ``predictions`` the head.
    """
    head = resolve_head(head, classes)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    scaled = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(inputs)  # ResNet V2 expects [-1, 1]
    backbone = keras.applications.ResNet50V2(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    features = keras.layers.Identity(name="features")(backbone(scaled))
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    if dropout > 0:
        pooled = keras.layers.Dropout(dropout, name="dropout")(pooled)
    units, activation = (1, "sigmoid") if head == "sigmoid" else (classes, "softmax")
    # float32 even under mixed precision: probabilities stay exact enough to compare and export.
    outputs = keras.layers.Dense(units, activation=activation, name="predictions", dtype="float32")(pooled)
    return keras.Model(inputs, outputs, name="resnet50v2_classifier")


def loss_for(head: str, label_smoothing: float = 0.0) -> keras.losses.Loss:
    """Binary or categorical cross-entropy; labels are one-hot for softmax (label smoothing needs it)."""
    if head == "sigmoid":
        return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
    return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)


def targets_for(head: str, classes: int):  # type: ignore[no-untyped-def]
    """A tf.data map turning integer labels into what ``loss_for(head)`` expects."""
    if head == "sigmoid":
        return lambda images, labels: (images, tf.cast(tf.reshape(labels, [-1, 1]), tf.float32))
    return lambda images, labels: (images, tf.one_hot(labels, classes))


def class_weights(counts: list[int]) -> dict[int, float]:
    """Balanced weights n / (k * n_c): a rare class counts as much as a common one in the loss."""
    total, present = sum(counts), sum(1 for c in counts if c)
    return {i: (total / (present * c) if c else 0.0) for i, c in enumerate(counts)}
