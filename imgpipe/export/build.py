"""A trained Keras model -> the ONNX serving bundle, gated on Keras-vs-ONNX parity.

The bundle is everything the service needs, and nothing from TensorFlow: ``model.onnx`` (see
``imgpipe.export.convert``), ``labels.json``, ``preprocess.json`` (what ``imgpipe.images``
needs), ``cam_weights.npy`` (the dense kernel, for class-activation maps), ``metadata.json``,
and with ``export.quantize`` its static INT8 variant ``model.int8.onnx``.

Keras and ONNX Runtime both predict the whole validation split; no bundle is written unless
every top-1 agrees and no probability differs by more than ``export.max_abs_diff``. The exported
model is then scored on val and test (ONNX Runtime's probabilities, what the service answers);
test decides nothing here, it is only reported.

The splits are read batch by batch (``export.batch_size`` images, the batches the models predict
on anyway), each once for every model, so memory holds a batch of pixels, never a split: only
the probabilities (images x classes) are kept whole. INT8 calibration reads just the first
``export.calibration_images`` training images, and the speed is measured on the first 256 of val.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from imgpipe.bundle import CAM_WEIGHTS, LABELS, METADATA, MODEL_FILES, PREPROCESS
from imgpipe.errors import StageError
from imgpipe.export.convert import FEATURES, INPUT, PROBABILITIES, cam_kernel, convert, npy, serving_model
from imgpipe.export.graph import training_ops_left
from imgpipe.export.parity import (
    Parity,
    compare,
    images_per_second,
    keras_probabilities,
    run_onnx,
    session,
)
from imgpipe.export.quantize import quantize
from imgpipe.files import sha256, write_folder_atomic, write_text_atomic
from imgpipe.params import Params
from imgpipe.training.evaluation import BASELINE_MARGIN, Scores, evaluate, predict_split, side_by_side

SPEED_IMAGES = 256  # the first validation images, timed in ONNX Runtime


@dataclass(frozen=True)
class Exported:
    metrics: dict  # as written to the reports' metrics.json
    timings: dict  # as written to the untracked timings JSON
    parity: Parity


def headline(scores: Scores) -> dict:
    """The numbers a bundle carries (and ``/metadata`` shows), split by split, and whether the
    model beats the weighted random guess on val."""
    return {split: {key: e.headline()[key] for key in ("accuracy", "macro_f1", "baseline_macro_f1")}
            for split, e in (("val", scores.val), ("test", scores.test))} | {
        "beats_baseline": scores.beats_baseline, "baseline_margin": BASELINE_MARGIN}


def build_bundle(model_path: Path, records: Path, out: Path, reports: Path, timings_path: Path, name: str,
                 params: Params) -> Exported:
    """Convert ``model_path``, check it against Keras on ``records``' validation split, and write
    ``reports/metrics.json``, then (parity passed) the bundle ``out`` named ``name``, then the
    timings; a failed parity check raises StageError after the metrics are written."""
    p = params.export
    started = time.monotonic()

    from imgpipe.training.models import seed_everything

    seed_everything(0)  # op determinism: Keras' side of the parity check is the same on every run
    import keras

    from imgpipe.records.read import DatasetError, first_images, image_batches, record_image_size
    from imgpipe.training.reports import dataset_version

    try:  # every split is listed and verified before the model loads; of pixels, only fixed samples yet
        labels = json.loads((records / "labels.json").read_text())
        size = record_image_size(records)
        val_batches = image_batches(records, "val", p.batch_size, size)
        test_batches = image_batches(records, "test", p.batch_size, size)
        timed = first_images(records, "val", SPEED_IMAGES, size)
        calibration = first_images(records, "train", p.calibration_images, size) if p.quantize else None
    except (OSError, json.JSONDecodeError, DatasetError) as exc:
        raise StageError(f"--records {records}: {exc}") from None
    try:
        model = keras.saving.load_model(model_path, compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds; the message is what matters
        raise StageError(f"--model {model_path}: cannot load ({str(exc).splitlines()[0]})") from None
    if tuple(model.input_shape[1:]) != (size, size, 3):
        raise StageError(f"--model {model_path} takes {model.input_shape[1:]} images, the records hold "
                         f"{(size, size, 3)}: train and export on the same pack.image_size")

    exported, dense = serving_model(model, len(labels))
    onnx_bytes = convert(exported, size, p.opset)
    left = training_ops_left(onnx_bytes)
    if left:
        raise StageError(f"the ONNX graph of {model_path} still holds training-only ops: {', '.join(left)}")

    sessions = {"onnx": session(onnx_bytes)}
    files = {MODEL_FILES["fp32"]: onnx_bytes}
    if calibration is not None:  # quantised first, so that each split is read once for every model
        files[MODEL_FILES["int8"]] = quantize(onnx_bytes, calibration)
        sessions["int8"] = session(files[MODEL_FILES["int8"]])
    runtime = {name: partial(run_onnx, sess, batch_size=p.batch_size) for name, sess in sessions.items()}

    # Parity gate on the whole validation split.
    y_true, val = predict_split(val_batches, {
        "keras": partial(keras_probabilities, model, batch_size=p.batch_size), **runtime})
    test_true, test = predict_split(test_batches, runtime)
    parity = compare(val["keras"], val["onnx"], p.max_abs_diff)
    scores = Scores(evaluate(y_true, val["onnx"], labels), evaluate(test_true, test["onnx"], labels))
    metrics = {"parity": parity.metrics(), **scores.metrics(), "class_activation_maps": dense is not None}
    timings = {"onnx_images_per_second": images_per_second(sessions["onnx"], timed, p.batch_size)}

    if "int8" in sessions:
        int8_scores = Scores(evaluate(y_true, val["int8"], labels), evaluate(test_true, test["int8"], labels))
        metrics["int8"] = {**side_by_side({"val": int8_scores.val.headline(), "test": int8_scores.test.headline()}),
                           "accuracy_change": round(int8_scores.val.accuracy - scores.val.accuracy, 6),
                           "top1_agreement": float(np.mean(val["int8"].argmax(1) == val["onnx"].argmax(1)))}
        timings["int8_images_per_second"] = images_per_second(sessions["int8"], timed, p.batch_size)
        timings["int8_speedup"] = timings["int8_images_per_second"] / timings["onnx_images_per_second"]

    pack = params.pack
    files[LABELS] = (json.dumps(labels, indent=2) + "\n").encode()
    files[PREPROCESS] = (json.dumps({"image_size": size, "pad_color": list(pack.pad_color),
                                            "resample": pack.resample}, indent=2) + "\n").encode()
    if dense is not None:
        files[CAM_WEIGHTS] = npy(cam_kernel(dense, len(labels)))
    outputs = {PROBABILITIES: ["batch", len(labels)]}
    if dense is not None:
        outputs[FEATURES] = ["batch", *exported.outputs[1].shape[1:]]
    metadata = {
        "name": name,
        "version": sha256(onnx_bytes)[:12],  # content-derived: the same model always has the same version
        "dataset": dataset_version(records),
        "source": {"keras_model": model_path.name, "keras_model_sha256": sha256(model_path.read_bytes()),
                   "opset": p.opset},
        "input": {"name": INPUT, "shape": ["batch", size, size, 3], "dtype": "float32", "range": [0, 255]},
        "outputs": outputs,
        "metrics": headline(scores),
    }
    files[METADATA] = (json.dumps(metadata, indent=2) + "\n").encode()
    write_text_atomic(reports / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if not parity.passed:  # no bundle for a model ONNX Runtime does not reproduce
        raise StageError(f"{model_path}: {parity.failure()}")
    write_folder_atomic(out, files)

    timings["seconds"] = round(time.monotonic() - started, 1)
    # Timings differ on every run: an untracked report, never a DVC output.
    write_text_atomic(timings_path, json.dumps(timings, indent=2) + "\n")
    return Exported(metrics, timings, parity)
