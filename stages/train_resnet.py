"""Stage 3a, train ResNet50V2 from scratch on the packed TFRecords.

    python -m stages.train_resnet --records build/tfrecords --out build/models/resnet50v2 \\
        --reports reports/train_resnet

Keeps the weights of the epoch with the lowest validation loss, not the last. Writes the model
(``model.keras``, byte-reproducible), DVC metrics and plots (``metrics.json``, ``history.csv``,
``confusion.csv``) and pictures (curves, confusion matrix, most confident mistakes), and records
the run in Neptune (offline unless NEPTUNE_MODE says otherwise).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

from stages import params as params_module
from stages.cli import StageError, run
from stages.dataset import DatasetError, label_counts, make_dataset, record_image_size
from stages.evaluation import confusion_rows, evaluate, plot_confusion, plot_mistakes, worst_mistakes
from stages.modelio import save_model
from stages.params import ParamsError
from stages.store import write_csv_atomic, write_text_atomic
from stages.tracking import Tracker
from stages.training import build_resnet, class_weights, loss_for, resolve_head, seed_everything, targets_for

NAME = "train_resnet"
MODEL_NAME = "resnet50v2"


def dataset_version(folder: Path) -> str:
    """sha256 over the shards' names and bytes: which data a run saw, for the tracker."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.tfrecord")) + [folder / "labels.json"]:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def strategy_for(name: str):  # type: ignore[no-untyped-def]
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def optimizer_for(p, steps: int):  # type: ignore[no-untyped-def]
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
            row = {"epoch": epoch + 1, **{k: round(float(v), 6) for k, v in sorted((logs or {}).items())
                                          if k in ("loss", "accuracy", "val_loss", "val_accuracy")}}
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


def mistake_images(dataset, y_true: np.ndarray, outputs: np.ndarray) -> dict[int, np.ndarray]:  # type: ignore[no-untyped-def]
    """Only the images the mistakes picture shows, found by index in a second pass (not all in memory)."""
    wanted, found, offset = set(worst_mistakes(y_true, outputs)), {}, 0
    for images, _ in dataset:
        for i in wanted & set(range(offset, offset + len(images))):
            found[i] = images[i - offset].numpy()
        offset += len(images)
    return found


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [row["epoch"] for row in history]
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        for prefix, label in (("", "train"), ("val_", "validation")):
            values = [row.get(prefix + metric) for row in history]
            if all(v is not None for v in values):
                ax.plot(epochs, values, marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def write_dict_csv(path: Path, rows: list[dict]) -> None:
    header = list(rows[0]) if rows else ["epoch"]
    write_csv_atomic(path, header, ([row.get(key, "") for key in header] for row in rows))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m stages.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=Path, required=True, help="folder of TFRecords and labels.json")
    parser.add_argument("--out", type=Path, required=True, help="folder for model.keras")
    parser.add_argument("--reports", type=Path, default=Path(f"reports/{NAME}"),
                        help="metrics, plots and pictures (default: %(default)s)")
    params_module.add_section_flags(parser, "train")
    params_module.add_section_flags(parser, "train.resnet")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = params_module.load_for(args)
    train, p = params.train, params.train.resnet
    started = time.monotonic()
    seed_everything(p.seed)
    import keras

    if train.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        labels = json.loads((args.records / "labels.json").read_text())
        size = record_image_size(args.records)
        # Both splits are checksummed here, before anything else reads them.
        train_data = make_dataset(args.records, "train", p.batch_size, size, seed=p.seed,
                                  augment=params.augment if p.augment else None)
        val_data = make_dataset(args.records, "val", p.batch_size, size, training=False)
        counts = label_counts(args.records, "train", len(labels))
    except (OSError, json.JSONDecodeError, DatasetError) as exc:
        raise StageError(f"--records {args.records}: {exc}") from None
    try:
        head = resolve_head(train.head, len(labels))
    except ValueError as exc:
        raise ParamsError(f"{args.params}: {exc}") from None
    to_targets = targets_for(head, len(labels))
    steps = p.epochs * -(-sum(counts) // p.batch_size)

    tracker = Tracker(MODEL_NAME, tags=[MODEL_NAME, head, f"{size}px"])
    tracker.set("parameters", {"train": train.model_dump(), "augment": params.augment.model_dump(),
                               "image_size": size})
    tracker.set("data/version", dataset_version(args.records))
    tracker.set("data/train_images", sum(counts))

    with strategy_for(train.strategy).scope():
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
    batches = [(model.predict_on_batch(images), truth) for images, truth in val_data]  # one pass
    outputs = np.concatenate([out for out, _ in batches])
    y_true = np.concatenate([truth.numpy() for _, truth in batches])
    evaluation = evaluate(y_true, outputs, labels)
    metrics = {**evaluation.metrics(), "best_epoch": best.best_epoch, "epochs_run": len(history),
               "head": head, "image_size": size}

    save_model(model, args.out / "model.keras")
    reports = args.reports
    write_text_atomic(reports / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_dict_csv(reports / "history.csv", history)
    write_dict_csv(reports / "confusion.csv", confusion_rows(y_true, outputs, labels))
    plot_history(history, reports / "curves.png")
    plot_confusion(evaluation, reports / "confusion.png", f"{MODEL_NAME}: confusion matrix (validation)")
    plot_mistakes(mistake_images(val_data, y_true, outputs), y_true, outputs, labels, reports / "mistakes.png")

    for key in ("accuracy", "macro_f1", "best_epoch"):
        tracker.set(f"metrics/{key}", metrics[key])
    tracker.set("metrics/baseline_macro_f1", metrics["baseline"]["macro_f1"])
    for picture in ("curves", "confusion", "mistakes"):
        tracker.upload(f"pictures/{picture}", reports / f"{picture}.png")
    summary = io.StringIO()
    model.summary(print_fn=lambda line, **_: summary.write(line + "\n"))
    tracker.set("model/summary", summary.getvalue())
    tracker.stop()
    seconds = time.monotonic() - started
    print(f"{NAME}: val accuracy {evaluation.accuracy:.3f}, macro-F1 {evaluation.macro_f1:.3f} "
          f"(weighted random {evaluation.baseline_macro_f1:.3f}); best epoch {best.best_epoch} of {len(history)}; "
          f"{seconds:.0f} s; model {args.out / 'model.keras'}")


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), NAME)
