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


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Same seed, same inputs, same machine: bit-identical weights, with op determinism on
    (``train.deterministic``); off, the seeds still hold but some kernels add in any order.

    Also clears Keras' session, whose layer-name counters would otherwise give a second model
    built in the same process other names, and so another saved file."""
    keras.backend.clear_session()
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    else:  # explicitly: an earlier training in this process may have turned it on
        from tensorflow.python.framework import config

        config.disable_op_determinism()


def set_precision(precision: str) -> str | None:
    """Keras' global dtype policy for ``train.precision``; after ``seed_everything``, whose
    clear_session resets it. Returns a warning for a combination that runs but makes no sense:
    float16 on a machine without a GPU is emulated, slower than float32."""
    keras.mixed_precision.set_global_policy(precision)
    if precision == "mixed_float16" and not tf.config.list_logical_devices("GPU"):
        return ("train.precision mixed_float16 on a machine without a GPU: CPUs emulate float16, "
                "slower than float32; use mixed_bfloat16 on CPUs with BF16, or float32")
    return None


def float32_copy(model: keras.Model) -> keras.Model:
    """The same network and weights with every layer in float32: what is saved, evaluated and
    exported, whatever precision trained it (mixed precision keeps its variables in float32
    already, so this is exact; only the compute dtype changes)."""
    if all(layer.dtype_policy.name == "float32" for layer in model._flatten_layers()):  # noqa: SLF001
        return model

    def as_float32(node):  # type: ignore[no-untyped-def]
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy" or node.get("class_name") == "DTypePolicyMap":
                return "float32"
            return {key: as_float32(value) for key, value in node.items()}
        if isinstance(node, list):
            return [as_float32(item) for item in node]
        return "float32" if node in ("mixed_float16", "mixed_bfloat16") else node

    copy = model.__class__.from_config(as_float32(model.get_config()))
    copy.set_weights(model.get_weights())
    return with_adapted_state(copy)


def with_adapted_state(model: keras.Model) -> keras.Model:
    """``model`` with each Normalization's mean and variance recomputed from its variables.

    Normalization keeps them as tensors made from its variables when adapted or loaded, not when
    ``set_weights`` assigns the variables: without this, a copy would normalise with the initial
    mean 0 and variance 1 (AutoKeras' models start with an adapted Normalization)."""
    for layer in model._flatten_layers(include_self=False):  # noqa: SLF001
        if isinstance(layer, keras.layers.Normalization) and layer.built:
            layer.finalize_state()
    return model


def strategy_for(name: str) -> tf.distribute.Strategy:
    """default: the current device; mirrored: every local GPU in sync (or, with no GPU, every
    logical CPU device, which is how it is tested); multi_worker: the machines in TF_CONFIG.

    Call it before any other TensorFlow work: MultiWorkerMirroredStrategy configures collective
    ops when TensorFlow starts, and fails once anything has run."""
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


BACKBONE = "resnet50v2"  # the name Keras gives ResNet50V2's convolutional base


def build_resnet(image_size: int, classes: int, head: str = "auto", dropout: float = 0.0,
                 batchnorm_momentum: float = 0.99) -> keras.Model:
    """ResNet50V2 without weights (nothing is downloaded), global pooling, new head.

    Layer names are part of the contract with the export stage: ``features`` is the last
    convolutional feature map, ``pool`` the global average, ``predictions`` the head.
    ``batchnorm_momentum`` is set on every batch normalization of the backbone (Keras' own is 0.99).
    """
    head = resolve_head(head, classes)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    scaled = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(inputs)  # ResNet V2 expects [-1, 1]
    backbone = keras.applications.ResNet50V2(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = batchnorm_momentum
    features = keras.layers.Identity(name="features")(backbone(scaled))
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    if dropout > 0:
        pooled = keras.layers.Dropout(dropout, name="dropout")(pooled)
    units, activation = (1, "sigmoid") if head == "sigmoid" else (classes, "softmax")
    # float32 even under mixed precision: probabilities stay exact enough to compare and export.
    outputs = keras.layers.Dense(units, activation=activation, name="predictions", dtype="float32")(pooled)
    return keras.Model(inputs, outputs, name="resnet50v2_classifier")


def backbone(model: keras.Model) -> keras.Model:
    return model.get_layer(BACKBONE)


def load_backbone_weights(model: keras.Model, weights: str, params_files: list[Path]) -> None:
    """``train.resnet.weights`` into the backbone of ``build_resnet``'s model: ``none`` leaves it as
    initialised, ``imagenet`` fetches Keras' ImageNet weights (a download: needs internet once, then
    Keras' cache), anything else is the path of a weights file of ResNet50V2's base, as
    ``backbone(model).save_weights("x.weights.h5")`` writes or Keras' ``..._notop.h5`` ImageNet file.
    A missing or incompatible file is a params error naming it (exit code 2)."""
    if weights == "none":
        return
    where = f"{' + '.join(map(str, params_files))}: train.resnet.weights"
    if weights == "imagenet":
        try:
            source = keras.applications.ResNet50V2(include_top=False, weights="imagenet")
        except Exception as exc:  # noqa: BLE001 - a failed download shows up as many kinds of error
            raise ParamsError(f"{where}: imagenet: cannot fetch Keras' ImageNet weights "
                              f"({str(exc).splitlines()[0]}); offline, pass a weights file instead") from None
        backbone(model).set_weights(source.get_weights())
        return
    path = Path(weights)
    if not path.is_file():
        raise ParamsError(f"{where}: {path}: no such file (none, imagenet or a .weights.h5 file)")
    try:
        backbone(model).load_weights(path)
    except Exception as exc:  # noqa: BLE001 - Keras and h5py raise many kinds; the message says which
        raise ParamsError(f"{where}: {path}: not ResNet50V2 base weights ({str(exc).splitlines()[0]})") from None


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
