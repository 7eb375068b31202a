"""A trained Keras model -> the ONNX serving bundle, gated on Keras-vs-ONNX parity.

The bundle is everything the service needs, and nothing from TensorFlow: ``model.onnx`` (see
``imgpipe.export.convert``), ``labels.json``, ``preprocess.json`` (what ``imgpipe.images``
needs), ``cam_weights.npy`` (the dense kernel, for class-activation maps), ``metadata.json``,
and with ``export.quantize`` its static INT8 variant ``model.int8.onnx``.

Keras and ONNX Runtime both predict the whole validation split; no bundle is written unless
every top-1 agrees and no probability differs by more than ``export.max_abs_diff``. The exported
model is then scored on val and test (ONNX Runtime's probabilities, what the service answers);
test decides nothing here, it is only reported.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgpipe.bundle import CAM_WEIGHTS, LABELS, METADATA, MODEL_FILES, PREPROCESS
from imgpipe.errors import StageError
from imgpipe.export.convert import FEATURES, INPUT, PROBABILITIES, cam_kernel, convert, npy, serving_model
from imgpipe.export.graph import training_ops_left
from imgpipe.export.parity import Parity, compare, images_per_second, keras_probabilities, run_onnx, session
from imgpipe.export.quantize import quantize
from imgpipe.files import sha256, write_folder_atomic, write_text_atomic
from imgpipe.params import Params
from imgpipe.training.evaluation import BASELINE_MARGIN, Scores, evaluate, side_by_side


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

    from imgpipe.records.read import DatasetError, load_arrays, record_image_size
    from imgpipe.training.reports import dataset_version

    try:
        labels = json.loads((records / "labels.json").read_text())
        size = record_image_size(records)
        images, y_true = load_arrays(records, "val", size)
        test_images, test_true = load_arrays(records, "test", size)
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

    # Parity gate on the whole validation split.
    keras_probs = keras_probabilities(model, images, p.batch_size)
    sess = session(onnx_bytes)
    onnx_probs = run_onnx(sess, images, p.batch_size)
    parity = compare(keras_probs, onnx_probs, p.max_abs_diff)
    scores = Scores(evaluate(y_true, onnx_probs, labels),
                    evaluate(test_true, run_onnx(sess, test_images, p.batch_size), labels))
    metrics = {"parity": parity.metrics(), **scores.metrics(), "class_activation_maps": dense is not None}
    timings = {"onnx_images_per_second": images_per_second(sess, images[:256], p.batch_size)}

    files = {MODEL_FILES["fp32"]: onnx_bytes}
    if p.quantize:
        calibration, _ = load_arrays(records, "train", size)
        int8 = quantize(onnx_bytes, calibration[:p.calibration_images])
        int8_sess = session(int8)
        int8_probs = run_onnx(int8_sess, images, p.batch_size)
        int8_scores = Scores(evaluate(y_true, int8_probs, labels),
                             evaluate(test_true, run_onnx(int8_sess, test_images, p.batch_size), labels))
        metrics["int8"] = {**side_by_side({"val": int8_scores.val.headline(), "test": int8_scores.test.headline()}),
                           "accuracy_change": round(int8_scores.val.accuracy - scores.val.accuracy, 6),
                           "top1_agreement": float(np.mean(int8_probs.argmax(1) == onnx_probs.argmax(1)))}
        timings["int8_images_per_second"] = images_per_second(int8_sess, images[:256], p.batch_size)
        timings["int8_speedup"] = timings["int8_images_per_second"] / timings["onnx_images_per_second"]
        files[MODEL_FILES["int8"]] = int8

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
