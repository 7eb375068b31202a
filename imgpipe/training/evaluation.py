"""Evaluation shared by the trainers: the numbers and pictures a reviewer asks for.

Accuracy, macro-F1, per-class precision/recall/F1, the confusion matrix, and a weighted-random
baseline (guessing each class as often as it occurs) so a score can be read against chance. A
model must beat that guess on val by ``BASELINE_MARGIN`` to count as having learned anything
(``Scores.beats_baseline``); the serve stage never picks one that does not.
Pictures are written with fixed settings and no metadata, so the same predictions give the
same PNG bytes, as DVC outputs must.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

DIGITS = 6  # metrics are rounded so the JSON does not carry float noise
# Val macro-F1 must be at least the weighted random guess's plus this. 0.1 is well above the noise
# of guessing on a few dozen val images (for two balanced classes and 40 images one standard
# deviation of a guess's accuracy is 0.08) while any model that learned the task clears it easily.
BASELINE_MARGIN = 0.1
Predict = Callable[[np.ndarray], np.ndarray]  # a batch of images -> its class probabilities


@dataclass(frozen=True)
class Evaluation:
    labels: list[str]
    confusion: np.ndarray  # confusion[true, predicted] = count
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]
    baseline_accuracy: float
    baseline_macro_f1: float

    def headline(self) -> dict:
        """The numbers people compare, rounded: accuracy and macro-F1, and the weighted random guess's."""
        return {"accuracy": round(self.accuracy, DIGITS), "macro_f1": round(self.macro_f1, DIGITS),
                "baseline_accuracy": round(self.baseline_accuracy, DIGITS),
                "baseline_macro_f1": round(self.baseline_macro_f1, DIGITS)}

    def per_class_metrics(self) -> dict:
        return {label: {k: round(v, DIGITS) if isinstance(v, float) else v for k, v in scores.items()}
                for label, scores in self.per_class.items()}


def side_by_side(splits: dict[str, dict]) -> dict:
    """{split: {name: value}} -> {name: {split: value}}: DVC flattens metrics into columns in key
    order, so this puts ``accuracy.val`` next to ``accuracy.test`` in ``dvc metrics show``."""
    names = next(iter(splits.values()))
    return {name: {split: values[name] for split, values in splits.items()} for name in names}


@dataclass(frozen=True)
class Scores:
    """A model's evaluation on val (which chose it) and on test (which chose nothing)."""

    val: Evaluation
    test: Evaluation

    @property
    def beats_baseline(self) -> bool:
        return self.val.macro_f1 >= self.val.baseline_macro_f1 + BASELINE_MARGIN

    def metrics(self) -> dict:
        """The DVC metrics: each number for val and test side by side, then the verdict."""
        return {**side_by_side({"val": self.val.headline(), "test": self.test.headline()}),
                "beats_baseline": self.beats_baseline, "baseline_margin": BASELINE_MARGIN}

    def per_class(self) -> dict:
        """Precision, recall, F1 and support per class and split (too wide for a metrics table)."""
        return {"val": self.val.per_class_metrics(), "test": self.test.per_class_metrics()}

    def summary(self) -> str:
        """One line for a stage's summary: val and test side by side, against chance."""
        return (f"val accuracy {self.val.accuracy:.3f}, macro-F1 {self.val.macro_f1:.3f}; test accuracy "
                f"{self.test.accuracy:.3f}, macro-F1 {self.test.macro_f1:.3f} (weighted random guess "
                f"{self.val.baseline_macro_f1:.3f})")

    def warning(self) -> str | None:
        """The loud line for a model no better than chance, else None."""
        return None if self.beats_baseline else chance_warning(self.val.macro_f1, self.val.baseline_macro_f1)


def chance_warning(val_macro_f1: float, guess_macro_f1: float, margin: float = BASELINE_MARGIN,
                   then: str = "`serve.model: best` will not serve this model") -> str:
    """The loud line for a model whose val macro-F1 is not ``margin`` above the weighted random
    guess's, ending with what follows from it: the trainers print it from their scores, the demo's
    summary and the release from the metrics files."""
    return (f"NO BETTER THAN CHANCE: val macro-F1 {val_macro_f1:.3f} is not at least {margin:.2f} above the "
            f"weighted random guess's {guess_macro_f1:.3f}; {then}")


def class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """(N, K) softmax outputs as they are; (N,) or (N, 1) sigmoid outputs become (N, 2)."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim == 2 and outputs.shape[1] > 1:
        return outputs
    positive = outputs.reshape(-1)
    return np.stack([1.0 - positive, positive], axis=1)


def weighted_random_baseline(support: np.ndarray) -> tuple[float, float]:
    """Expected accuracy and macro-F1 of guessing class c with probability p_c (its share).

    For class c both precision and recall are then p_c in expectation, so its F1 is p_c too:
    accuracy = sum p_c^2, macro-F1 = mean p_c over the classes present.
    """
    present = support[support > 0]
    shares = present / present.sum()
    return float(np.sum(shares**2)), float(np.mean(shares))


def evaluate(y_true: np.ndarray, outputs: np.ndarray, labels: list[str]) -> Evaluation:
    probabilities = class_probabilities(outputs)
    y_true = np.asarray(y_true).reshape(-1).astype(int)
    y_pred = probabilities.argmax(axis=1)
    indices = list(range(len(labels)))
    confusion = confusion_matrix(y_true, y_pred, labels=indices)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=indices, zero_division=0)
    present = support > 0  # macro-F1 over the classes the split holds
    baseline_accuracy, baseline_f1 = weighted_random_baseline(support)
    per_class = {
        label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                "support": int(support[i])}
        for i, label in enumerate(labels)
    }
    return Evaluation(labels, confusion, float(np.mean(y_true == y_pred)), float(np.mean(f1[present])),
                      per_class, baseline_accuracy, baseline_f1)


def confusion_rows(y_true: np.ndarray, outputs: np.ndarray, labels: list[str]) -> list[dict[str, str]]:
    """One {actual, predicted} row per image: the input of DVC's confusion-matrix plot template."""
    predicted = class_probabilities(outputs).argmax(axis=1)
    return [{"actual": labels[int(t)], "predicted": labels[int(p)]}
            for t, p in zip(np.asarray(y_true).reshape(-1), predicted, strict=True)]


def worst_mistakes(y_true: np.ndarray, outputs: np.ndarray, count: int = 16) -> list[int]:
    """Indices of the wrong predictions made with the highest confidence, most confident first."""
    probabilities = class_probabilities(outputs)
    y_true = np.asarray(y_true).reshape(-1).astype(int)
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != y_true)
    confidence = probabilities[wrong, predicted[wrong]]
    order = np.lexsort((wrong, -confidence))  # ties broken by index: stable across runs
    return [int(i) for i in wrong[order][:count]]


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version or date in the file


def plot_confusion(evaluation: Evaluation, path: Path, title: str) -> None:
    plt = _figure()
    size = max(6.0, 0.5 * len(evaluation.labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(evaluation.confusion, cmap="Blues")
    ax.set_xticks(range(len(evaluation.labels)), evaluation.labels, rotation=45, ha="right")
    ax.set_yticks(range(len(evaluation.labels)), evaluation.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    peak = evaluation.confusion.max() or 1
    for (row, col), value in np.ndenumerate(evaluation.confusion):
        ax.text(col, row, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    ax.set_title(f"{title}\naccuracy {evaluation.accuracy:.3f}, macro-F1 {evaluation.macro_f1:.3f} "
                 f"(weighted random {evaluation.baseline_macro_f1:.3f})", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_mistakes(images, y_true: np.ndarray, outputs: np.ndarray, labels: list[str], path: Path,  # type: ignore[no-untyped-def]
                  count: int = 16) -> None:
    """A grid of the most confidently wrong images, each titled 'actual -> predicted (p)'.

    ``images[i]`` is image ``i``: an array of them all, or a dict holding just the mistakes."""
    plt = _figure()
    chosen = worst_mistakes(y_true, outputs, count)
    columns = 4
    rows = max(1, -(-len(chosen) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 2.2, rows * 2.4), squeeze=False)
    probabilities = class_probabilities(outputs)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, chosen, strict=False):
        predicted = int(probabilities[index].argmax())
        ax.imshow(np.clip(images[index], 0, 255).astype(np.uint8))
        ax.set_title(f"{labels[int(y_true[index])]} -> {labels[predicted]} ({probabilities[index, predicted]:.2f})",
                     fontsize=8)
    if not chosen:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle("Most confident mistakes (validation)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def predict_split(batches: Iterable[tuple[np.ndarray, np.ndarray]],
                  predictors: dict[str, Predict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(labels, each predictor's probabilities) over a split read batch by batch, in record order.

    One pass for all predictors: the pixels are read (and PNG-decoded) once and held a batch at a
    time; only the per-image results, images x classes, are kept for the whole split."""
    truth: list[np.ndarray] = []
    found: dict[str, list[np.ndarray]] = {name: [] for name in predictors}
    for images, labels in batches:
        truth.append(labels)
        for name, predict in predictors.items():
            found[name].append(predict(images))
    return np.concatenate(truth), {name: np.concatenate(parts) for name, parts in found.items()}
