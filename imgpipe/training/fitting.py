"""What the trainers' Keras fits share: the epoch callbacks (history and Neptune, the best epoch
with early stopping, the backup of each finished epoch) and predictions on a whole split.

All the callbacks' state is plain data, so a resumed run can put it back exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from imgpipe.training import backup
from imgpipe.training.reports import Predictions, history_row
from imgpipe.training.tracking import Tracker


def epoch_logger(tracker: Tracker, history: list[dict]):  # type: ignore[no-untyped-def]
    """Keras callback: each epoch's numbers to Neptune and to the DVC plots history."""
    import keras

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            history.append(history_row(epoch + 1, logs or {}))
            log_epoch(tracker, history[-1])

    return EpochLogger()


def log_epoch(tracker: Tracker, row: dict) -> None:
    for key, value in row.items():
        if key != "epoch":
            tracker.log(f"train/{key}", value, step=row["epoch"])


def best_epoch(patience: int):  # type: ignore[no-untyped-def]
    """Keras callback keeping the weights of the epoch with the lowest val loss (restored by
    ``restore_best``) and stopping a phase after ``patience`` epochs without a better one (0: never).

    Keras' EarlyStopping does the second, but resets its counters in ``on_train_begin``; here all
    of the state is plain data, so a resumed run can put it back (``state``/``load``)."""
    import keras

    class BestEpoch(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.best, self.best_epoch, self.weights = np.inf, 0, None
            self.phase_best, self.wait = np.inf, 0

        def start_phase(self) -> None:  # each fit phase counts patience afresh, as EarlyStopping would
            self.phase_best, self.wait = np.inf, 0

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            loss = float((logs or {}).get("val_loss", np.inf))
            if loss < self.best:
                self.best, self.best_epoch, self.weights = loss, epoch + 1, self.model.get_weights()
            if loss < self.phase_best:
                self.phase_best, self.wait = loss, 0
            else:
                self.wait += 1
                if patience and self.wait >= patience:
                    self.model.stop_training = True

        def restore_best(self, model) -> None:  # type: ignore[no-untyped-def]
            if self.weights is not None:
                model.set_weights(self.weights)

        def state(self) -> dict:
            return {"epoch": self.best_epoch, "loss": self.best, "phase_loss": self.phase_best, "wait": self.wait}

        def load(self, state: dict, weights: list | None) -> None:
            self.best, self.best_epoch, self.weights = state["best"]["loss"], state["best"]["epoch"], weights
            self.phase_best, self.wait = state["best"]["phase_loss"], state["best"]["wait"]

    return BestEpoch()


def epoch_backup(folder: Path, phase: int, history: list[dict], best):  # type: ignore[no-untyped-def]
    """Keras callback (last in the list) backing up each finished epoch for a resume."""
    import keras

    class EpochBackup(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            backup.save_epoch(folder, self.model, epoch + 1, phase,
                              {"history": history, "stopped": bool(self.model.stop_training)},
                              best.state(), best.weights)

    return EpochBackup()


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
