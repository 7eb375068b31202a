"""A serving bundle on disk (written by ``stages.export``) loaded into ONNX Runtime. No TensorFlow.

    bundle = Bundle.load(Path("model"))
    pixels, geometry = bundle.preprocess(image_bytes)       # imgpipe.images, as in training
    probabilities, features = bundle.predict(np.stack([pixels]))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from imgpipe.bundle import (
    CAM_WEIGHTS,
    LABELS,
    METADATA,
    MODEL_FILES,
    PREPROCESS,
    SERVING,
    default_bundle,
    missing_files,
)
from imgpipe.images import Geometry, preprocess

__all__ = ["Bundle", "BundleError", "MODEL_FILES", "default_bundle", "missing_files"]

class BundleError(Exception):
    """The bundle folder is missing or incomplete; the message names the file."""


@dataclass
class Bundle:
    folder: Path
    labels: list[str]
    image_size: int
    pad_color: tuple[int, int, int]
    resample: str
    metadata: dict[str, Any]
    session: ort.InferenceSession
    cam_weights: np.ndarray | None = None  # C x classes, when the model outputs ``features``
    precision: str = SERVING.precision

    @classmethod
    def load(cls, folder: Path, threads: int = SERVING.threads, spin: bool = True,
             precision: str = SERVING.precision) -> Bundle:
        """``threads``: ONNX Runtime's intra-op threads (0: one per core). ``spin``: whether they
        busy-wait for work between operators, which is fastest when they have the cores to
        themselves and slower when other threads (decoding, HTTP) need the same cores.
        ``precision``: which graph of the bundle runs (``MODEL_FILES``)."""
        missing = missing_files(folder)
        if missing:
            raise BundleError(f"{folder}: not a serving bundle (missing {', '.join(missing)}); "
                              "run `dvc repro` (build/serving/) or `dvc pull model.dvc` (model/)")
        model_file = folder / MODEL_FILES[precision]
        if not model_file.is_file():
            raise BundleError(f"{model_file}: this bundle has no {precision} variant; export it with "
                              "`export.quantize: true`, or serve the fp32 model")
        try:
            labels = json.loads((folder / LABELS).read_text())
            prep = json.loads((folder / PREPROCESS).read_text())
            metadata = json.loads((folder / METADATA).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BundleError(f"{folder}: unreadable bundle file ({exc})") from None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
            raise BundleError(f"{model_file}: ONNX Runtime cannot load it ({exc})") from None
        outputs = [output.name for output in session.get_outputs()]
        cam = folder / CAM_WEIGHTS
        cam_weights = np.load(cam, allow_pickle=False) if cam.is_file() and "features" in outputs else None
        return cls(folder, labels, int(prep["image_size"]), tuple(prep["pad_color"]), prep["resample"], metadata,
                   session, cam_weights, precision)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", self.folder.name))

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", "unknown"))

    def preprocess(self, data: bytes) -> tuple[np.ndarray, Geometry]:
        """Image bytes -> the uint8 square the model takes (the pack stage's own function)."""
        return preprocess(data, self.image_size, self.pad_color, self.resample)

    def predict(self, pixels: np.ndarray, with_features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """N x S x S x 3 uint8 -> (N x classes probabilities, N x h x w x C features or None)."""
        wanted = ["probabilities"] + (["features"] if with_features and self.cam_weights is not None else [])
        results = self.session.run(wanted, {"image": pixels.astype(np.float32)})
        return results[0], (results[1] if len(results) > 1 else None)

    def class_activation_map(self, features: np.ndarray, class_index: int) -> np.ndarray:
        """h x w map of one image's ``features`` weighted by the dense kernel of ``class_index``."""
        assert self.cam_weights is not None
        return features @ self.cam_weights[:, class_index]
