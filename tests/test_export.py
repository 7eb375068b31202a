"""stages.export: the ONNX bundle, its parity gate, class-activation outputs, byte-identical re-export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from imgpipe.export.graph import TRAINING_OPS
from imgpipe.export.quantize import quantize
from imgpipe.records.read import load_arrays
from tests.conftest import EXPORT_PARAMS, export_bundle, small_cnn


def run_onnx(bundle: Path, images: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(outputs, {"image": images.astype(np.float32)})


def test_bundle_holds_a_parity_checked_onnx_model_with_activation_maps(bundles, records):
    bundle = bundles["cam"]
    assert sorted(p.name for p in bundle.iterdir()) == ["cam_weights.npy", "labels.json", "metadata.json",
                                                       "model.onnx", "preprocess.json"]
    metrics = json.loads((bundle.parent.parent / "reports" / "cam" / "metrics.json").read_text())
    assert metrics["parity"]["passed"] and metrics["parity"]["top1_agreement"] == 1.0
    assert metrics["parity"]["max_abs_diff"] <= 1e-4 and metrics["parity"]["images"] > 0
    assert json.loads((bundle / "labels.json").read_text()) == ["cat", "dog", "owl"]
    assert json.loads((bundle / "preprocess.json").read_text()) == {"image_size": 32, "pad_color": [0, 0, 0],
                                                                   "resample": "bilinear"}
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert metadata["outputs"] == {"probabilities": ["batch", 3], "features": ["batch", 16, 16, 16]}
    # The bundle carries the report's numbers split by split; the report puts the splits side by side.
    for split in ("val", "test"):
        assert metadata["metrics"][split] == {key: metrics[key][split]
                                              for key in ("accuracy", "macro_f1", "baseline_macro_f1")}
    assert metadata["metrics"]["beats_baseline"] == metrics["beats_baseline"] == (
        metrics["macro_f1"]["val"] >= metrics["baseline_macro_f1"]["val"] + metrics["baseline_margin"])

    graph = onnx.load(bundle / "model.onnx")
    onnx.checker.check_model(graph)
    assert graph.opset_import[0].version >= 17
    (image,) = graph.graph.input
    assert image.name == "image" and image.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [output.name for output in graph.graph.output] == ["probabilities", "features"]
    assert not {node.op_type for node in graph.graph.node} & TRAINING_OPS  # the Keras model has Dropout

    # Independently of the stage: ONNX Runtime matches Keras on the validation images...
    import keras

    model = keras.saving.load_model(bundle.parent.parent / "models" / "cam" / "model.keras")
    images, _ = load_arrays(records[3], "val", 32)
    probabilities, features = run_onnx(bundle, images, ["probabilities", "features"])
    np.testing.assert_allclose(probabilities, model.predict(images.astype(np.float32), verbose=0), atol=1e-5)
    # The reported test accuracy is ONNX Runtime's on the held-out test split.
    test_images, test_labels = load_arrays(records[3], "test", 32)
    (test_probabilities,) = run_onnx(bundle, test_images, ["probabilities"])
    assert metrics["accuracy"]["test"] == pytest.approx(np.mean(test_probabilities.argmax(1) == test_labels), abs=1e-6)
    # ...and the exported kernel turns the features back into the probabilities (so CAMs are right).
    bias = model.get_layer("predictions").bias.numpy()
    logits = features.mean(axis=(1, 2)) @ np.load(bundle / "cam_weights.npy") + bias
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(expected / expected.sum(1, keepdims=True), probabilities, atol=1e-5)


def test_export_again_gives_the_same_bytes_and_int8_is_optional(bundles, records, tmp_path):
    again = export_bundle(small_cnn(32, 3, "avg"), records[3], tmp_path, "cam", "--quantize",
                          "--calibration-images", "8")
    for name in ("model.onnx", "cam_weights.npy", "labels.json", "preprocess.json"):
        assert (again / name).read_bytes() == (bundles["cam"] / name).read_bytes(), name
    metrics = json.loads((tmp_path / "reports" / "cam" / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "accuracy_change", "top1_agreement"} <= set(metrics["int8"])
    assert set(metrics["int8"]["accuracy"]) == {"val", "test"}
    timings = json.loads((tmp_path / "cam.json").read_text())
    assert timings["int8_speedup"] > 0
    quantized = onnx.load(again / "model.int8.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in quantized.graph.node}
    # Calibrated on the first 8 training images in record order, read without the rest of the split.
    train, _ = load_arrays(records[3], "train", 32)
    assert len(train) > 8
    assert (again / "model.int8.onnx").read_bytes() == quantize((again / "model.onnx").read_bytes(), train[:8])
    images, _ = load_arrays(records[3], "val", 32)
    (probabilities,) = run_onnx(again, images, ["probabilities"])
    assert probabilities.shape == (len(images), 3)


def test_sigmoid_head_exports_two_class_probabilities(bundles, records):
    bundle = bundles["sigmoid"]
    images, _ = load_arrays(records[2], "val", 32)
    probabilities, features = run_onnx(bundle, images, ["probabilities", "features"])
    assert probabilities.shape == (len(images), 2)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-6)
    kernel = np.load(bundle / "cam_weights.npy")
    assert kernel.shape == (16, 2) and np.array_equal(kernel[:, 0], -kernel[:, 1])


def test_flatten_and_max_pooling_heads(bundles, records, tmp_path):
    flat = bundles["flat"]
    assert [o.name for o in onnx.load(flat / "model.onnx").graph.output] == ["probabilities"]
    assert not (flat / "cam_weights.npy").exists()
    assert "features" not in json.loads((flat / "metadata.json").read_text())["outputs"]
    # AutoKeras picks global max pooling at times: maps are offered for it too.
    pooled = export_bundle(small_cnn(32, 3, "max"), records[3], tmp_path, "max")
    assert (pooled / "cam_weights.npy").exists()


def test_zero_padding_before_max_pooling_survives_onnx_runtime_optimisation(records, tmp_path):
    """ResNet's pool1 (ZeroPadding2D -> MaxPooling2D on activations that can be negative): ONNX
    Runtime's Pad fusion would pad with -inf instead of 0; the export rewrites it exactly."""
    from imgpipe.training.models import seed_everything

    seed_everything(3)
    import keras

    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 7, strides=2, padding="same")(x)  # no activation: negative values
    x = keras.layers.ZeroPadding2D(1)(x)
    x = keras.layers.MaxPooling2D(3, strides=2)(x)
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    bundle = export_bundle(keras.Model(inputs, outputs), records[3], tmp_path, "padded")
    ops = {node.op_type for node in onnx.load(bundle / "model.onnx").graph.node}
    assert "Pad" not in ops and "Max" in ops
    metrics = json.loads((tmp_path / "reports" / "padded" / "metrics.json").read_text())
    assert metrics["parity"]["max_abs_diff"] <= 1e-5


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.export", *args], capture_output=True, text=True,
                          cwd=cwd, env={"PYTHONPATH": str(Path(__file__).parent.parent), "PATH": "/usr/bin:/bin",
                                        "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=300)


def test_failed_parity_is_a_one_line_error_and_leaves_no_bundle(bundles, records, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(EXPORT_PARAMS)
    model = bundles["cam"].parent.parent / "models" / "cam" / "model.keras"
    measured = json.loads((bundles["cam"].parent.parent / "reports" / "cam" / "metrics.json").read_text())
    if measured["parity"]["max_abs_diff"] == 0:
        # The gate fails only above a threshold, and max_abs_diff must be >= 0: with a measured
        # difference of exactly 0 no threshold is below it, so this machine cannot make parity fail.
        pytest.skip("Keras and ONNX Runtime agree to the last bit on this machine (max_abs_diff 0): "
                    "no --max-abs-diff lies below the difference, so parity cannot be made to fail")
    strict = f"{measured['parity']['max_abs_diff'] / 10:.1e}"
    out = tmp_path / "bundle"
    result = cli("--params", str(params), "--model", str(model), "--records", str(records[3]), "--out", str(out),
                 "--reports", str(tmp_path / "reports"), "--timings", str(tmp_path / "t.json"),
                 "--max-abs-diff", strict)
    assert result.returncode == 1, result.stderr
    assert "parity failed" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text())["parity"]["passed"] is False


def test_a_missing_model_or_missing_records_are_one_line_errors_and_leave_no_bundle(bundles, records, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(EXPORT_PARAMS)
    model = bundles["cam"].parent.parent / "models" / "cam" / "model.keras"
    out = tmp_path / "bundle"
    missing = cli("--params", str(params), "--model", str(tmp_path / "nope.keras"), "--records", str(records[3]),
                  "--out", str(out))
    assert missing.returncode == 1 and "nope.keras" in missing.stderr and "Traceback" not in missing.stderr
    no_records = cli("--params", str(params), "--model", str(model), "--records", str(tmp_path / "none"),
                     "--out", str(out))
    assert no_records.returncode == 1 and "--records" in no_records.stderr and "Traceback" not in no_records.stderr
    assert not out.exists()


def test_identity_reshapes_are_dropped_and_nothing_else_changes():
    """The no-op Reshapes tf2onnx leaves on 1 x 1 maps go (they made exports differ between
    runs); a Reshape that changes the shape stays, and the outputs are the same."""
    from onnx import TensorProto, helper, numpy_helper

    from imgpipe.export.graph import without_identity_reshapes

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, 1, 4])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("Reshape", ["r", "same"], ["noop"]),  # [-1, 4, 1, 1] of a [batch, 4, 1, 1]
         helper.make_node("Reshape", ["noop", "nhwc"], ["y"])],
        "g", [x], [y],
        [numpy_helper.from_array(np.array([-1, 4, 1, 1], np.int64), "same"),
         numpy_helper.from_array(np.array([-1, 1, 1, 4], np.int64), "nhwc")])
    before = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
    after = onnx.load_from_string(without_identity_reshapes(before))
    assert [(node.op_type, list(node.input)) for node in after.graph.node] == [("Relu", ["x"]),
                                                                              ("Reshape", ["r", "nhwc"])]
    assert [tensor.name for tensor in after.graph.initializer] == ["nhwc"]
    pixels = np.random.default_rng(0).normal(size=(3, 4, 1, 1)).astype(np.float32)
    run = [ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": pixels})[0]
           for model in (before, after.SerializeToString())]
    np.testing.assert_array_equal(run[0], run[1])
