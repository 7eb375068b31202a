"""imgpipe/training/evaluation.py: metrics against hand-computed values, baseline, pictures that do not vary."""

from __future__ import annotations

import numpy as np
import pytest

from imgpipe.training.evaluation import (
    BASELINE_MARGIN,
    Scores,
    class_probabilities,
    confusion_rows,
    evaluate,
    plot_confusion,
    plot_mistakes,
    weighted_random_baseline,
    worst_mistakes,
)

LABELS = ["cat", "dog", "owl"]


def one_hot(predicted: list[int], classes: int = 3, confidence: float = 0.8) -> np.ndarray:
    rest = (1 - confidence) / (classes - 1)
    outputs = np.full((len(predicted), classes), rest)
    outputs[np.arange(len(predicted)), predicted] = confidence
    return outputs


def test_metrics_match_a_hand_computed_example():
    y_true = [0, 0, 0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 1, 2, 0]
    ev = evaluate(np.array(y_true), one_hot(y_pred), LABELS)
    assert ev.confusion.tolist() == [[3, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert ev.accuracy == pytest.approx(6 / 8)
    # cat: P = 3/4, R = 3/4; dog: P = 2/3, R = 1; owl: P = 1, R = 1/2
    f1 = [0.75, 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.5 / 1.5]
    assert [ev.per_class[label]["f1"] for label in LABELS] == pytest.approx(f1)
    assert ev.macro_f1 == pytest.approx(np.mean(f1))
    assert ev.per_class["cat"]["support"] == 4
    assert ev.baseline_accuracy == pytest.approx(0.5**2 + 0.25**2 + 0.25**2)
    assert ev.baseline_macro_f1 == pytest.approx(1 / 3)
    assert ev.headline()["accuracy"] == 0.75 and set(ev.per_class_metrics()) == set(LABELS)


def test_weighted_random_baseline_matches_simulation():
    support = np.array([70, 20, 10])
    accuracy, macro_f1 = weighted_random_baseline(support)
    rng = np.random.default_rng(0)
    y_true = np.repeat(np.arange(3), support)
    simulated = [evaluate(y_true, np.eye(3)[rng.choice(3, size=100, p=support / 100)], LABELS) for _ in range(300)]
    assert np.mean([e.accuracy for e in simulated]) == pytest.approx(accuracy, abs=0.01)
    assert np.mean([e.macro_f1 for e in simulated]) == pytest.approx(macro_f1, abs=0.02)


def test_a_sigmoid_head_reads_as_two_classes():
    assert np.allclose(class_probabilities(np.array([[0.9], [0.2]])), [[0.1, 0.9], [0.8, 0.2]])
    ev = evaluate(np.array([1, 0, 0]), np.array([0.9, 0.2, 0.6]), ["cat", "dog"])
    assert ev.accuracy == pytest.approx(2 / 3)
    assert confusion_rows(np.array([1, 0]), np.array([0.9, 0.7]), ["cat", "dog"]) == [
        {"actual": "dog", "predicted": "dog"}, {"actual": "cat", "predicted": "dog"}]


def test_worst_mistakes_are_the_most_confident_wrong_ones():
    y_true = np.array([0, 1, 2, 0, 1])
    outputs = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.1, 0.85, 0.05], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    assert worst_mistakes(y_true, outputs) == [2, 3, 1]
    assert worst_mistakes(y_true, outputs, count=1) == [2]


def test_pictures_are_written_and_identical_across_runs(tmp_path):
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 3, size=40)
    outputs = rng.dirichlet(np.ones(3), size=40)
    images = rng.integers(0, 256, size=(40, 24, 24, 3)).astype(np.float32)
    ev = evaluate(y_true, outputs, LABELS)
    for run in ("a", "b"):
        plot_confusion(ev, tmp_path / run / "confusion.png", "Confusion matrix")
        plot_mistakes(images, y_true, outputs, LABELS, tmp_path / run / "mistakes.png")
    for name in ("confusion.png", "mistakes.png"):
        first = (tmp_path / "a" / name).read_bytes()
        assert first.startswith(b"\x89PNG") and len(first) > 1000
        assert first == (tmp_path / "b" / name).read_bytes()


def test_the_baseline_guard_is_val_macro_f1_against_the_guess_plus_the_margin():
    y_true = np.array([0] * 6 + [1] * 4)  # the weighted random guess scores macro-F1 0.5
    majority = evaluate(y_true, one_hot([0] * 10, 2), ["a", "b"])  # always the common class
    perfect = evaluate(y_true, one_hot(list(y_true), 2), ["a", "b"])
    assert majority.baseline_macro_f1 == pytest.approx(0.5) and majority.macro_f1 == pytest.approx(0.375)
    # Test plays no part: a perfect test score does not rescue a chance-level val score.
    stuck = Scores(val=majority, test=perfect)
    assert not stuck.beats_baseline and "NO BETTER THAN CHANCE" in stuck.warning()
    assert stuck.metrics()["beats_baseline"] is False and stuck.metrics()["baseline_margin"] == BASELINE_MARGIN
    # Side by side for `dvc metrics show`: accuracy.val, accuracy.test, macro_f1.val, ...
    assert list(stuck.metrics())[:2] == ["accuracy", "macro_f1"]
    assert stuck.metrics()["accuracy"] == {"val": 0.6, "test": 1.0}
    learned = Scores(val=perfect, test=majority)
    assert learned.beats_baseline and learned.warning() is None
    assert "test accuracy 0.600" in learned.summary() and "val accuracy 1.000" in learned.summary()
    # Just at the margin counts; just below does not.
    ten = np.arange(10) % 2
    at_margin = evaluate(ten, one_hot([0, 1, 0, 1, 0, 1, 1, 0, 1, 0], 2), ["a", "b"])  # 6 of 10 right
    assert at_margin.macro_f1 == pytest.approx(0.6) and at_margin.baseline_macro_f1 == pytest.approx(0.5)
    assert Scores(at_margin, at_margin).beats_baseline
    below = evaluate(ten, one_hot([1, 0, 1, 0, 1, 0, 0, 1, 0, 1], 2), ["a", "b"])  # 4 of 10 right
    assert not Scores(below, below).beats_baseline
