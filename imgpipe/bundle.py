"""The serving bundle's contract, shared by the export stage that writes it and the service that
reads it: its file names, where the service looks for it, and the service's default settings.

Standard library only: the service imports this without the training stack.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from imgpipe.errors import StageError

# The exported graph, and its static INT8 variant (``export.quantize: true``): ~2-3x faster on CPUs
# with integer dot-product instructions, at the accuracy change the export stage reports.
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
LABELS = "labels.json"  # class names, in output order
PREPROCESS = "preprocess.json"  # what imgpipe.images.preprocess needs: image_size, pad_color, resample
METADATA = "metadata.json"  # name, content-derived version, data set, metrics, input and outputs
CAM_WEIGHTS = "cam_weights.npy"  # dense kernel for class-activation maps, when the head allows them
SETTINGS = "settings.json"  # the service settings the serve stage checked (BUNDLE_SETTINGS); flags override them
REQUIRED = (MODEL_FILES["fp32"], LABELS, PREPROCESS, METADATA)
DEFAULT_BUNDLES = (Path("model"), Path("build/serving"))  # the release (`dvc pull model.dvc`), the last repro

# One batch per core: a lone request still gets every ONNX Runtime thread, and under load a batch
# runs while the next one is being decoded (measured in bench/serve.py).
ONE_PER_CORE = os.cpu_count() or 1


@dataclass(frozen=True)
class ServingDefaults:
    """The service's defaults: `python -m serve` flags, ``serve.app.Settings`` and params.yaml's
    ``serve:`` section all start from these."""

    max_batch: int = 32  # images per ONNX Runtime call
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for company
    max_queue: int = 256  # images waiting; beyond it: 503 + Retry-After
    max_body_bytes: int = 20_000_000  # larger requests get 413
    max_pixels: int = 40_000_000  # larger images get 422 (decompression-bomb guard)
    max_batch_images: int = 64  # images in one /predict/batch request
    threads: int = 0  # ONNX Runtime intra-op threads per batch; 0 = one per core
    workers: int = ONE_PER_CORE  # batches run at once (each on `threads` threads)
    precision: str = "fp32"  # a key of MODEL_FILES
    remote_timeout: float = 10.0  # seconds for a whole {"url": ...} fetch, redirects and trickling included
    upload_timeout: float = 30.0  # seconds for a client to send its whole request body
    drain_seconds: float = 30.0  # on SIGTERM, how long requests already accepted may take to be answered


SERVING = ServingDefaults()
# What the serve stage writes into the bundle's SETTINGS file (params.yaml's serve: section, checked
# over HTTP by that stage); `python -m serve` starts with them.
BUNDLE_SETTINGS = ("max_batch", "max_wait_ms", "max_queue", "max_body_bytes", "max_pixels")


def missing_files(folder: Path) -> list[str]:
    """The bundle files ``folder`` lacks (all of them when it does not exist)."""
    return [name for name in REQUIRED if not (folder / name).is_file()]


# What this version's export writes under metadata.json's "metrics" (imgpipe.export.build).
METRICS_KEYS = ("val", "test", "beats_baseline", "baseline_margin")


def evaluated_metrics(folder: Path, metadata: dict) -> dict:
    """``metadata["metrics"]`` of the bundle in ``folder``, in this version's layout (val and test
    apart, with the baseline verdict); a bundle from an older export is a StageError naming its
    file and the fix, so no caller reads a missing key."""
    metrics = metadata.get("metrics") or {}
    missing = [key for key in METRICS_KEYS if key not in metrics]
    if missing:
        raise StageError(f"{folder / METADATA}: metrics lack {', '.join(missing)} (an export older than the "
                         "val/test split); re-export with `dvc repro`")
    return metrics


def default_bundle() -> Path:
    """model/ when a release was pulled, else build/serving/."""
    return next((path for path in DEFAULT_BUNDLES if (path / MODEL_FILES["fp32"]).is_file()), DEFAULT_BUNDLES[0])
