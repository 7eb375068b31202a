"""Training ResNet50V2 from scratch on the packed TFRecords.

Keeps the weights of the epoch with the lowest validation loss, not the last. Writes the model
(``model.keras``, byte-reproducible), DVC metrics and plots (``metrics.json``, ``history.csv``,
``confusion.csv``) and pictures (curves, confusion matrix, most confident mistakes), and records
the run in Neptune (offline unless NEPTUNE_MODE says otherwise).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgpipe.errors import StageError
from imgpipe.params import Params, ResnetParams
from imgpipe.records.read import DatasetError, label_counts, make_dataset, record_image_size
from imgpipe.training.evaluation import Evaluation
from imgpipe.training.models import (
    build_resnet,
    class_weights,
    loss_for,
    params_head,
    seed_everything,
    strategy_for,
    targets_for,
)
from imgpipe.training.reports import history_row, publish, start_run
from imgpipe.training.tracking import Tracker

log = logging.getLogger(__name__)

MODEL_NAME = "resnet50v2"


@dataclass(frozen=True)
class Trained:
    evaluation: Evaluation  # on the whole validation split, with the best epoch's weights
    best_epoch: int
    epochs_run: int


def optimizer_for(p: ResnetParams, steps: int):  # type: ignore[no-untyped-def]
    import keras

    rate = p.learning_rate
    if p.schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(p.learning_rate, decay_steps=max(1, steps))
    if p.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=0.9)
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
        counts = label_counts(records, "train", len(labels))
    except (OSError, json.JSONDecodeError, DatasetError) as exc:
        raise StageError(f"--records {records}: {exc}") from None
    head = params_head(common.head, len(labels), params_files)
    to_targets = targets_for(head, len(labels))
    steps = p.epochs * -(-sum(counts) // p.batch_size)

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
        model = build_resnet(size, len(labels), head, p.dropout)
        model.compile(optimizer=optimizer_for(p, steps), loss=loss_for(head, p.label_smoothing), metrics=["accuracy"])
    history: list[dict] = []
    best = best_weights()
    callbacks = [epoch_logger(tracker, history), best]
    if p.patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=p.patience))
    weights = class_weights(counts) if p.class_weighting else None
    model.fit(train_data.map(to_targets), validation_data=val_data.map(to_targets), epochs=p.epochs,
              class_weight=weights, callbacks=callbacks, verbose=2)

    # Evaluation on the whole validation split, with the best epoch's weights.
    # model.predict, not predict_on_batch: under tf.distribute it splits and regathers batches in order.
    outputs = model.predict(val_data.map(lambda images, _: images), verbose=0)
    y_true = np.concatenate([truth.numpy() for _, truth in val_data])
    extra = {"best_epoch": best.best_epoch, "epochs_run": len(history), "head": head, "image_size": size}
    evaluation, _ = publish(model, MODEL_NAME, out, reports, labels, y_true, outputs, history, extra,
                            images_at(val_data), tracker)
    tracker.stop()
    return Trained(evaluation, best.best_epoch, len(history))
