"""Keras against ONNX Runtime on the same images: the parity gate no bundle is written without,
and ONNX Runtime's speed. ONNX Runtime is imported only when used."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from imgpipe.export.convert import INPUT, PROBABILITIES


@dataclass(frozen=True)
class Parity:
    """How far ONNX Runtime's probabilities are from Keras' on the validation split."""

    images: int
    max_diff: float  # largest |keras - onnx| over all probabilities
    agreement: float  # share of images with the same top-1 class
    allowed: float  # export.max_abs_diff

    @property
    def passed(self) -> bool:
        return bool(self.max_diff <= self.allowed and self.agreement == 1.0)

    def metrics(self) -> dict:
        return {"images": self.images, "max_abs_diff": float(f"{self.max_diff:.2e}"),
                "top1_agreement": self.agreement, "passed": self.passed}

    def failure(self) -> str:
        return (f"ONNX parity failed: max |keras - onnx| {self.max_diff:.2e} (allowed {self.allowed:g}), "
                f"top-1 agreement {self.agreement:.4f} (needs 1.0)")


def compare(keras_probs: np.ndarray, onnx_probs: np.ndarray, allowed: float) -> Parity:
    images = len(onnx_probs)
    max_diff = float(np.max(np.abs(keras_probs - onnx_probs))) if images else 0.0
    agreement = float(np.mean(keras_probs.argmax(1) == onnx_probs.argmax(1))) if images else 1.0
    return Parity(images, max_diff, agreement, allowed)


def keras_probabilities(model, images: np.ndarray, batch_size: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The Keras model's class probabilities (N x classes, a one-unit sigmoid head widened).

    ``predict_on_batch`` runs the very function ``predict`` runs on each ``batch_size`` slice,
    without ``predict``'s per-call set-up, which would dominate when called once a batch."""
    from imgpipe.training.evaluation import class_probabilities

    return class_probabilities(np.concatenate([
        np.asarray(model.predict_on_batch(images[i:i + batch_size].astype(np.float32)))
        for i in range(0, len(images), batch_size)]))


def session(model_bytes: bytes):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def run_onnx(sess, images: np.ndarray, batch_size: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.concatenate([sess.run([PROBABILITIES], {INPUT: images[i:i + batch_size].astype(np.float32)})[0]
                           for i in range(0, len(images), batch_size)])


def images_per_second(sess, images: np.ndarray, batch_size: int, repeats: int = 3) -> float:  # type: ignore
    best = np.inf
    for _ in range(repeats):
        started = time.perf_counter()
        run_onnx(sess, images, batch_size)
        best = min(best, time.perf_counter() - started)
    return len(images) / best
