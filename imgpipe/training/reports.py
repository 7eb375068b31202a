"""What every trainer leaves behind, written the same way for ResNet50V2 and AutoKeras.

``publish`` evaluates the predictions on the validation and test splits and writes the model and
the DVC outputs (``metrics.json`` with val and test side by side, ``per_class.json``,
``history.csv`` for the curves,
``confusion.csv`` and ``confusion_test.csv`` for DVC's confusion template), the pictures
(``pictures/``: curves, both confusion matrices, the most confident val mistakes), the same
numbers and pictures to the Neptune run. Nothing written here holds a time or a path.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgpipe import params as params_module
from imgpipe.cli import entry_parser
from imgpipe.files import write_csv_atomic, write_text_atomic
from imgpipe.training.evaluation import (
    Scores,
    confusion_rows,
    evaluate,
    plot_confusion,
    plot_mistakes,
    worst_mistakes,
)
from imgpipe.training.modelio import save_model
from imgpipe.training.tracking import Tracker

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


def trainer_parser(name: str, description: str, section: str, reports: str) -> argparse.ArgumentParser:
    """The flags every trainer takes: --records, --out, --reports, and its params sections."""
    parser = entry_parser(f"python -m stages.{name}", description)
    parser.add_argument("--records", type=Path, required=True, help="folder of TFRecords and labels.json")
    parser.add_argument("--out", type=Path, required=True, help="folder for model.keras")
    parser.add_argument("--reports", type=Path, default=Path(f"reports/{name}"),
                        help=f"{reports} (default: %(default)s)")
    params_module.add_section_flags(parser, "train")
    params_module.add_section_flags(parser, section)
    return parser


def dataset_version(folder: Path) -> str:
    """sha256 over the shards' names and bytes: which data a run saw, for the tracker."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.tfrecord")) + [folder / "labels.json"]:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def git_commit() -> str:
    """The checked-out commit (with '+dirty' when the tree has changes), or 'unknown' outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.strip() + ("+dirty" if dirty.strip() else "")


def start_run(name: str, tags: list[str], parameters: dict, records: Path, train_images: int) -> Tracker:
    tracker = Tracker(name, tags=tags)
    tracker.set("parameters", parameters)
    tracker.set("data/version", dataset_version(records))
    tracker.set("data/train_images", train_images)
    tracker.set("source/git_commit", git_commit())
    return tracker


def print_summary(name: str, scores: Scores, details: str, reports: Path) -> None:
    """A trainer's closing lines: val and test, then, for a model no better than chance, a loud one."""
    print(f"{name}: {scores.summary()}; {details}")
    if scores.warning():
        print(f"{name}: {scores.warning()}; see {reports / 'pictures'}/ and {reports / 'metrics.json'}")


def history_row(epoch: int, logs: dict) -> dict:
    return {"epoch": epoch, **{key: round(float(logs[key]), 6) for key in HISTORY_KEYS if key in logs}}


def plot_history(history: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [row["epoch"] for row in history]
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        for prefix, label in (("", "train"), ("val_", "validation")):
            values = [row.get(prefix + metric) for row in history]
            if values and all(v is not None for v in values):
                ax.plot(epochs, values, marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def write_dict_csv(path: Path, rows: list[dict]) -> None:
    header = list(rows[0]) if rows else ["epoch"]
    write_csv_atomic(path, header, ([row.get(key, "") for key in header] for row in rows))


@dataclass(frozen=True)
class Predictions:
    """A split's true labels and the model's outputs for it, in record order."""

    y_true: np.ndarray
    outputs: np.ndarray


def publish(model, model_name: str, out: Path, reports: Path, labels: list[str],  # type: ignore[no-untyped-def]
            val: Predictions, test: Predictions, history: list[dict], extra: dict,
            images_at: Callable[[list[int]], dict[int, np.ndarray]], tracker: Tracker) -> Scores:
    """Evaluate on val and test, then write the model, the DVC metrics and plots, the pictures,
    and the tracker's copy. Everything was chosen on val before this; test is only reported.

    ``images_at(indices)`` returns the validation images the mistakes picture shows."""
    scores = Scores(evaluate(val.y_true, val.outputs, labels), evaluate(test.y_true, test.outputs, labels))
    metrics = {**scores.metrics(), **extra}
    save_model(model, out / "model.keras")
    write_text_atomic(reports / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_text_atomic(reports / "per_class.json", json.dumps(scores.per_class(), indent=2) + "\n")
    write_dict_csv(reports / "history.csv", history)
    write_dict_csv(reports / "confusion.csv", confusion_rows(val.y_true, val.outputs, labels))
    write_dict_csv(reports / "confusion_test.csv", confusion_rows(test.y_true, test.outputs, labels))
    pictures = reports / "pictures"
    plot_history(history, pictures / "curves.png", model_name)
    plot_confusion(scores.val, pictures / "confusion.png", f"{model_name}: confusion matrix (validation)")
    plot_confusion(scores.test, pictures / "confusion_test.png", f"{model_name}: confusion matrix (test)")
    plot_mistakes(images_at(worst_mistakes(val.y_true, val.outputs)), val.y_true, val.outputs, labels,
                  pictures / "mistakes.png")

    for split, evaluation in (("val", scores.val), ("test", scores.test)):
        for key, value in evaluation.headline().items():  # the DVC metrics' numbers, rounded alike
            tracker.set(f"metrics/{split}/{key}", value)
    tracker.set("metrics/beats_baseline", scores.beats_baseline)
    for key, value in extra.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            tracker.set(f"metrics/{key}", value)
    for picture in ("curves", "confusion", "confusion_test", "mistakes"):
        tracker.upload(f"pictures/{picture}", pictures / f"{picture}.png")
    summary = io.StringIO()
    model.summary(print_fn=lambda line, **_: summary.write(line + "\n"))
    tracker.set("model/summary", summary.getvalue())
    return scores
