"""Training ResNet50V2 on the packed TFRecords, from scratch or from a weights file.

Keeps the weights of the epoch with the lowest validation loss, not the last, then evaluates them
on val and, once, on the held-out test split. Writes the model
(``model.keras``, byte-reproducible), DVC metrics and plots (``metrics.json``, ``history.csv``,
``confusion.csv``) and pictures (curves, confusion matrix, most confident mistakes), and records
the run in Neptune (offline unless NEPTUNE_MODE says otherwise).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgpipe.errors import StageError
from imgpipe.params import Params, ResnetParams
from imgpipe.records.read import DatasetError, label_counts, make_dataset, record_image_size
from imgpipe.training.evaluation import Scores
from imgpipe.training.models import (
    backbone,
    build_resnet,
    class_weights,
    load_backbone_weights,
    loss_for,
    params_head,
    seed_everything,
    strategy_for,
    targets_for,
)
from imgpipe.training.reports import Predictions, history_row, publish, start_run
from imgpipe.training.tracking import Tracker

log = logging.getLogger(__name__)

MODEL_NAME = "resnet50v2"


@dataclass(frozen=True)
class Trained:
    scores: Scores  # on the whole val and test splits, with the best epoch's weights
    best_epoch: int
    epochs_run: int


def learning_rate(p: ResnetParams, steps: int, warmup_steps: int):  # type: ignore[no-untyped-def]
    """``p.learning_rate``, reached linearly over ``warmup_steps``, then constant or cosine-decayed
    to 0 by the end of ``steps`` (all the steps of this fit, warm-up included)."""
    import keras

    schedules = keras.optimizers.schedules
    decay_steps = max(1, steps - warmup_steps)
    if not warmup_steps:
        return schedules.CosineDecay(p.learning_rate, decay_steps) if p.schedule == "cosine" else p.learning_rate
    # alpha=1: the "decay" ends where it starts, i.e. constant after the warm-up.
    return schedules.CosineDecay(0.0, decay_steps, alpha=0.0 if p.schedule == "cosine" else 1.0,
                                 warmup_target=p.learning_rate, warmup_steps=warmup_steps)


def passes_per_epoch(steps_per_pass: int, epochs: int, min_steps: int) -> int:
    """Passes over the training split in one epoch: one, or as many as it takes for ``epochs``
    epochs to make at least ``min_steps`` optimizer steps (``train.resnet.min_steps``)."""
    return max(1, -(-min_steps // (steps_per_pass * epochs)))


def optimizer_for(p: ResnetParams, steps: int, warmup_steps: int = 0):  # type: ignore[no-untyped-def]
    import keras

    rate = learning_rate(p, steps, warmup_steps)
    if p.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=0.9, weight_decay=p.weight_decay or None)
    if p.weight_decay:
        return keras.optimizers.AdamW(rate, weight_decay=p.weight_decay)
    return keras.optimizers.Adam(rate)


def epoch_logger(tracker: Tracker, history: list[dict]):  # type: ignore[no-untyped-def]
    """Keras callback: each epoch's numbers to Neptune and to the DVC plots history."""
    import keras

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            row = history_row(epoch + 1, logs or {})
            history.append(row)
            for key, value in row.items():
                if key != "epoch":
                    tracker.log(f"train/{key}", value, step=epoch + 1)

    return EpochLogger()


def best_weights():  # type: ignore[no-untyped-def]
    """Keras callback keeping the weights of the epoch with the lowest val loss, restored at the end."""
    import keras

    class BestWeights(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.best, self.best_epoch, self.weights = np.inf, 0, None

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            loss = float((logs or {}).get("val_loss", np.inf))
            if loss < self.best:
                self.best, self.best_epoch, self.weights = loss, epoch + 1, self.model.get_weights()

        def on_train_end(self, logs: dict | None = None) -> None:
            if self.weights is not None:
                self.model.set_weights(self.weights)

    return BestWeights()


def predictions(model, dataset) -> Predictions:  # type: ignore[no-untyped-def]
    """The model's outputs on a whole split, in record order, with the true labels.

    model.predict, not predict_on_batch: under tf.distribute it splits and regathers batches in order."""
    outputs = model.predict(dataset.map(lambda images, _: images), verbose=0)
    return Predictions(np.concatenate([truth.numpy() for _, truth in dataset]), outputs)


def images_at(dataset) -> Callable[[list[int]], dict[int, np.ndarray]]:  # type: ignore[no-untyped-def]
    """Only the images the mistakes picture shows, found by index in a second pass (not all in memory)."""
    return lambda indices: _images_at(dataset, set(indices))


def _images_at(dataset, wanted: set[int]) -> dict[int, np.ndarray]:  # type: ignore[no-untyped-def]
    found, offset = {}, 0
    for images, _ in dataset:
        for i in wanted & set(range(offset, offset + len(images))):
            found[i] = images[i - offset].numpy()
        offset += len(images)
    return found


def train(params: Params, records: Path, out: Path, reports: Path, params_files: list[Path], name: str) -> Trained:
    """Train on ``records``, write ``out/model.keras`` and the reports; ``params_files`` are named
    in a params error, ``name`` starts the line that says which distribution strategy runs."""
    common, p = params.train, params.train.resnet
    seed_everything(p.seed)  # op determinism before any TensorFlow work
    import keras

    try:
        labels = json.loads((records / "labels.json").read_text())
        size = record_image_size(records)
        # Both splits are checksummed here, before anything else reads them.
        train_data = make_dataset(records, "train", p.batch_size, size, seed=p.seed,
                                  augment=params.augment if p.augment else None)
        val_data = make_dataset(records, "val", p.batch_size, size, training=False)
        test_data = make_dataset(records, "test", p.batch_size, size, training=False)
        counts = label_counts(records, "train", len(labels))
    except (OSError, json.JSONDecodeError, DatasetError) as exc:
        raise StageError(f"--records {records}: {exc}") from None
    head = params_head(common.head, len(labels), params_files)
    to_targets = targets_for(head, len(labels))
    steps_per_pass = -(-sum(counts) // p.batch_size)
    passes = passes_per_epoch(steps_per_pass, p.epochs, p.min_steps)
    steps_per_epoch = passes * steps_per_pass
    if passes > 1:  # each pass reshuffles and draws fresh augmentation, from the same seed
        train_data = train_data.repeat(passes)
        log.info("%s: %d training images: each epoch is %d passes, %d steps in all (train.resnet.min_steps %d)",
                 name, sum(counts), passes, steps_per_epoch * p.epochs, p.min_steps)

    parameters = {"train": common.model_dump(exclude={"automl"}), "augment": params.augment.model_dump(),
                  "image_size": size}
    tracker = start_run(MODEL_NAME, [MODEL_NAME, head, f"{size}px"], parameters, records, sum(counts))

    # Seeded again once the tracker has started: Neptune draws from Python's generator, which
    # Keras uses to seed its own, so a run with tracking off would otherwise get other weights.
    seed_everything(p.seed)
    if common.mixed_precision:  # after seed_everything, whose clear_session resets the policy
        keras.mixed_precision.set_global_policy("mixed_float16")
    strategy = strategy_for(common.strategy)
    if common.strategy != "default":
        log.info("%s: %s with %d replica(s)", name, type(strategy).__name__, strategy.num_replicas_in_sync)
    with strategy.scope():
        model = build_resnet(size, len(labels), head, p.dropout, p.batchnorm_momentum)
        load_backbone_weights(model, p.weights, params_files)
    history: list[dict] = []
    best = best_weights()
    callbacks = [epoch_logger(tracker, history), best]
    if p.patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=p.patience))
    fit = functools.partial(model.fit, train_data.map(to_targets), validation_data=val_data.map(to_targets),
                            class_weight=class_weights(counts) if p.class_weighting else None,
                            callbacks=callbacks, verbose=2)
    frozen = min(p.freeze_epochs, p.epochs) if p.weights != "none" else 0
    if frozen:  # the new head first, on top of the loaded backbone (whose batch norm stays in inference)
        backbone(model).trainable = False
        with strategy.scope():
            model.compile(optimizer=optimizer_for(p, frozen * steps_per_epoch), loss=loss_for(head, p.label_smoothing),
                          metrics=["accuracy"])
        fit(epochs=frozen)
        backbone(model).trainable = True
    if p.epochs > frozen and not (frozen and model.stop_training):
        epochs = p.epochs - frozen
        with strategy.scope():
            model.compile(optimizer=optimizer_for(p, epochs * steps_per_epoch, p.warmup_epochs * steps_per_epoch),
                          loss=loss_for(head, p.label_smoothing), metrics=["accuracy"])
        fit(epochs=p.epochs, initial_epoch=frozen)

    # The best epoch's weights were chosen on val; now val and, once, test are evaluated with them.
    extra = {"best_epoch": best.best_epoch, "epochs_run": len(history), "head": head, "image_size": size,
             "weights": p.weights if p.weights in ("none", "imagenet") else Path(p.weights).name}
    scores = publish(model, MODEL_NAME, out, reports, labels, predictions(model, val_data),
                     predictions(model, test_data), history, extra, images_at(val_data), tracker)
    tracker.stop()
    return Trained(scores, best.best_epoch, len(history))
