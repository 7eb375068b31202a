"""Stage 4, export a trained Keras model to an ONNX serving bundle, gated on Keras-vs-ONNX parity.

    python -m stages.export --model build/models/resnet50v2/model.keras --records build/tfrecords \\
        --out build/onnx/resnet50v2 --reports reports/export/resnet50v2

The bundle (``--out``) is everything the service needs, and nothing from TensorFlow:
``model.onnx`` (input ``image``: float32 N x S x S x 3 in [0, 255], dynamic batch; output
``probabilities``: N x classes, and ``features``, the last convolutional map, when the head is
global pooling then dense), ``labels.json``, ``preprocess.json`` (what ``imgpipe.images`` needs),
``cam_weights.npy`` (the dense kernel, for class-activation maps) and ``metadata.json``.

Keras and ONNX Runtime both predict the whole validation split; the stage fails unless every
top-1 agrees and no probability differs by more than ``export.max_abs_diff``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from imgpipe import params as params_module
from imgpipe.cli import StageError, run
from imgpipe.files import sha256, write_folder_atomic, write_text_atomic

NAME = "export"
INPUT, PROBABILITIES, FEATURES = "image", "probabilities", "features"
# Ops that only make sense while training; none may survive into the serving graph.
TRAINING_OPS = {"Dropout", "RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m stages.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="trained model.keras")
    parser.add_argument("--records", type=Path, required=True, help="TFRecords folder (validation split, labels)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    parser.add_argument("--reports", type=Path, default=None,
                        help="folder for metrics.json (default: reports/export/NAME)")
    parser.add_argument("--timings", type=Path, default=None,
                        help="untracked JSON of speeds and seconds (default: logs/export_NAME.json)")
    parser.add_argument("--name", default=None, help="model name in the bundle (default: the model's folder name)")
    params_module.add_section_flags(parser, NAME)
    return parser.parse_args(argv)


# --- the serving graph ----------------------------------------------------------------------


def _producer(tensor):  # type: ignore[no-untyped-def]
    return tensor._keras_history.operation


def class_activation_source(model):  # type: ignore[no-untyped-def]
    """(feature map tensor, dense layer) when the head is [conv map] -> global pooling -> (dropout)
    -> dense (-> softmax/sigmoid), the shape class-activation maps need; else None (a flatten head).

    With average pooling the map is the exact CAM (the logit is the map's mean); with max pooling
    (an AutoKeras choice) it is the usual approximation, channel maps weighted the same way."""
    import keras

    layer = _producer(model.outputs[0])
    if isinstance(layer, keras.layers.Activation | keras.layers.Softmax):  # AutoKeras' head ends in Softmax
        layer = _producer(layer.input)
    if not isinstance(layer, keras.layers.Dense):
        return None
    dense = layer
    layer = _producer(dense.input)
    while isinstance(layer, keras.layers.Dropout | keras.layers.Identity):
        layer = _producer(layer.input)
    pooling = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)
    if not isinstance(layer, pooling) or layer.keepdims:
        return None
    return layer.input, dense


def serving_model(model, classes: int):  # type: ignore[no-untyped-def]
    """The trained model with named outputs: ``probabilities`` always N x classes (a one-unit
    sigmoid head becomes [1 - p, p]), plus ``features`` when class-activation maps are possible."""
    import keras

    image = keras.Input(model.input_shape[1:], dtype="float32", name=INPUT)
    source = class_activation_source(model)
    if source is not None:
        trunk = keras.Model(model.inputs, [model.outputs[0], source[0]])
        probabilities, features = trunk(image)
    else:
        probabilities, features = model(image), None
        if isinstance(probabilities, list | tuple):  # AutoKeras models keep a list of one output
            probabilities = probabilities[0]
    if probabilities.shape[-1] == 1 and classes == 2:
        probabilities = keras.layers.Concatenate()([1.0 - probabilities, probabilities])
    probabilities = keras.layers.Identity(name=PROBABILITIES)(probabilities)
    outputs = [probabilities] if features is None else [probabilities, keras.layers.Identity(name=FEATURES)(features)]
    return keras.Model(image, outputs), (None if source is None else source[1])


def cam_kernel(dense, classes: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Dense kernel as C x classes: a class's map is features @ kernel[:, class] (bias is a constant)."""
    kernel = np.asarray(dense.kernel.numpy(), dtype=np.float32)
    if kernel.shape[1] == 1 and classes == 2:  # sigmoid: logit p = w.x, and 1 - p goes with -w.x
        kernel = np.concatenate([-kernel, kernel], axis=1)
    return kernel


def to_onnx(model, image_size: int, opset: int):  # type: ignore[no-untyped-def]
    """tf2onnx conversion with stable names: input ``image``, outputs as the Keras layers are
    named, batch dimension ``batch``."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, image_size, image_size, 3), tf.float32, name=INPUT),)
    output_names = [tensor._keras_history.operation.name for tensor in model.outputs]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset, output_path=None)
    graph = proto.graph
    renamed = dict(zip([output.name for output in graph.output], output_names, strict=True))
    for node in graph.node:
        node.output[:] = [renamed.get(name, name) for name in node.output]
        node.input[:] = [renamed.get(name, name) for name in node.input]
    for value in list(graph.input) + list(graph.output):
        value.name = renamed.get(value.name, value.name)
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    proto.producer_name, proto.producer_version = "stages.export (tf2onnx)", tf2onnx.__version__
    zero_padded_max_pools(proto)
    return proto


def zero_padded_max_pools(proto) -> int:  # type: ignore[no-untyped-def]
    """Rewrite ``Pad(zeros) -> MaxPool`` as ``MaxPool(pads) -> Max(border mask)``; returns how many.

    Keras' ZeroPadding2D before MaxPooling2D (ResNet's ``pool1``) pads with zeros, but ONNX
    Runtime's Pad_Fusion folds the Pad into MaxPool's own ``pads``, which pad with -inf: where
    the window overlaps the border and the activations are negative, results change (1.5e-2 on
    the demo's probabilities, caught by the parity gate). The rewrite is exact: an output whose
    window touches the padding is max(max over the real values, 0), which the mask (0 on the
    border, the lowest float elsewhere) gives; no runtime fuses it wrongly."""
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    shapes = {value.name: [d.dim_value for d in value.type.tensor_type.shape.dim]
              for value in onnx.shape_inference.infer_shapes(proto).graph.value_info}
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    producers = {output: node for node in graph.node for output in node.output}
    rewritten = 0
    for pool in [node for node in graph.node if node.op_type == "MaxPool"]:
        pad = producers.get(pool.input[0])
        if pad is None or pad.op_type != "Pad" or consumers.get(pad.output[0]) != 1:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in list(pad.attribute) + list(pool.attribute)}
        pads = constants.get(pad.input[1]) if len(pad.input) > 1 else None
        value = constants.get(pad.input[2], np.zeros(1)) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
        shape = shapes.get(pad.input[0])
        if (pads is None or len(pads) != 8 or any(pads[[0, 1, 4, 5]]) or np.any(value != 0)
                or attrs.get("mode", b"constant") != b"constant" or any(attrs.get("pads", [0]))
                or attrs.get("ceil_mode", 0) or any(d != 1 for d in attrs.get("dilations", [1, 1]))
                or attrs.get("auto_pad", b"NOTSET") != b"NOTSET" or not shape or len(shape) != 4 or 0 in shape[2:]):
            continue
        (top, left), (bottom, right) = pads[2:4], pads[6:8]
        (kh, kw), (sh, sw) = attrs["kernel_shape"], attrs.get("strides", [1, 1])
        height, width = shape[2], shape[3]
        out_h, out_w = (height + top + bottom - kh) // sh + 1, (width + left + right - kw) // sw + 1
        rows, cols = np.arange(out_h) * sh, np.arange(out_w) * sw
        border_rows = (rows < top) | (rows + kh > top + height)
        border_cols = (cols < left) | (cols + kw > left + width)
        mask = np.where(border_rows[:, None] | border_cols[None, :], 0.0, np.finfo(np.float32).min)
        mask_name, pooled = f"{pool.name}/zero_pad_mask", f"{pool.output[0]}/unmasked"
        graph.initializer.append(numpy_helper.from_array(mask.astype(np.float32)[None, None], mask_name))
        del pool.attribute[:]
        pool.attribute.extend([helper.make_attribute("kernel_shape", [kh, kw]),
                               helper.make_attribute("strides", [sh, sw]),
                               helper.make_attribute("pads", [int(top), int(left), int(bottom), int(right)])])
        output = pool.output[0]
        pool.input[0], pool.output[0] = pad.input[0], pooled
        index = list(graph.node).index(pool)
        graph.node.insert(index + 1, helper.make_node("Max", [pooled, mask_name], [output], name=f"{pool.name}/mask"))
        graph.node.remove(pad)
        rewritten += 1
    used = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:  # the Pads' own constants
        graph.initializer.remove(tensor)
    return rewritten


def optimized(model_bytes: bytes) -> bytes:
    """ONNX Runtime's hardware-independent graph optimisations (constant folding, Conv+BatchNorm
    and other fusions, redundant nodes removed) written back as plain ONNX; servers apply the
    hardware-specific ones themselves at load time."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="ort-") as scratch:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(scratch) / "model.onnx")
        ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        return Path(options.optimized_model_filepath).read_bytes()


def without_identity_reshapes(model_bytes: bytes) -> bytes:
    """Drop every Reshape whose target equals its input's inferred shape (batch left as -1).

    tf2onnx's transpose optimiser leaves such no-op Reshapes where a feature map is 1 x 1, and
    whether one of them survived conversion and optimisation varied between runs of the same
    export (a byte-different ``model.onnx`` after ``dvc repro -f``, seen on a 32 px ResNet50V2).
    Removing all of them gives one graph whichever way a run went, and a little less work."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    inferred = shape_inference.infer_shapes(model).graph
    shapes = {value.name: [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
              for value in list(inferred.value_info) + list(inferred.input)}
    constants = {tensor.name: tensor for tensor in graph.initializer}
    outputs = {value.name for value in graph.output}
    for node in [node for node in graph.node if node.op_type == "Reshape" and node.output[0] not in outputs]:
        shape, target = shapes.get(node.input[0]), constants.get(node.input[1])
        if not shape or target is None or shape[0] is not None or None in shape[1:]:
            continue
        if numpy_helper.to_array(target).tolist() != [-1, *shape[1:]]:
            continue
        for consumer in graph.node:
            consumer.input[:] = [node.input[0] if name == node.output[0] else name for name in consumer.input]
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for tensor in [tensor for tensor in graph.initializer if tensor.name not in used]:
        graph.initializer.remove(tensor)
    produced = {name for node in graph.node for name in node.output}
    for value in [value for value in graph.value_info if value.name not in produced]:
        graph.value_info.remove(value)
    return model.SerializeToString()


def canonical(model_bytes: bytes) -> bytes:
    """The same graph with deterministic initializer names and order.

    Converter and optimiser merge identical constants (an untrained BatchNorm's ones and zeros,
    reshape targets) and identical nodes, and keep whichever name a hash map yields first, so
    two exports of one model differed in names alone. Constants are named by their content,
    nodes and their outputs by position (``Conv_12``, ``Conv_12:0``); the graph's inputs and
    outputs keep their names, and the computation is unchanged."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    renamed, unique = {}, {}
    for tensor in graph.initializer:
        nameless = onnx.TensorProto()
        nameless.CopyFrom(tensor)
        nameless.name = ""
        renamed[tensor.name] = f"const_{sha256(nameless.SerializeToString(deterministic=True))[:16]}"
        tensor.name = renamed[tensor.name]
        unique.setdefault(tensor.name, tensor)  # equal content, equal name: one copy is enough
    ordered = [unique[name] for name in sorted(unique)]
    del graph.initializer[:]
    graph.initializer.extend(ordered)
    outer = {value.name for value in list(graph.input) + list(graph.output)}
    for index, node in enumerate(graph.node):
        node.name = f"{node.op_type}_{index}"
        for k, name in enumerate(node.output):
            if name and name not in outer:
                renamed[name] = f"{node.name}:{k}"
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
    for value in graph.value_info:
        value.name = renamed.get(value.name, value.name)
    return model.SerializeToString(deterministic=True)


def convert(exported, image_size: int, opset: int) -> bytes:  # type: ignore[no-untyped-def]
    """The serving model as final ONNX bytes: converted, optimised, canonically named."""
    return canonical(without_identity_reshapes(optimized(to_onnx(exported, image_size, opset).SerializeToString())))


def npy(array: np.ndarray) -> bytes:
    """``np.save`` bytes (no pickles, no timestamps: the same array gives the same bytes)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def session(model_bytes: bytes):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def run_onnx(sess, images: np.ndarray, batch_size: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.concatenate([sess.run([PROBABILITIES], {INPUT: images[i:i + batch_size].astype(np.float32)})[0]
                           for i in range(0, len(images), batch_size)])


# --- INT8 -----------------------------------------------------------------------------------


def quantize(model_bytes: bytes, calibration: np.ndarray) -> bytes:
    """Static INT8 (QDQ, per-channel weights) calibrated on training images (MinMax, deterministic)."""
    from onnxruntime import quantization as q

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration[i:i + 16].astype(np.float32) for i in range(0, len(calibration), 16))

        def get_next(self):  # type: ignore[no-untyped-def]
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch}

    with tempfile.TemporaryDirectory(prefix="int8-") as scratch:
        source, target = Path(scratch) / "model.onnx", Path(scratch) / "model.int8.onnx"
        source.write_bytes(model_bytes)
        q.quantize_static(str(source), str(target), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                          extra_options={"CalibTensorRangeSymmetric": False})
        return target.read_bytes()


def images_per_second(sess, images: np.ndarray, batch_size: int, repeats: int = 3) -> float:  # type: ignore
    best = np.inf
    for _ in range(repeats):
        started = time.perf_counter()
        run_onnx(sess, images, batch_size)
        best = min(best, time.perf_counter() - started)
    return len(images) / best


# --- the stage ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = params_module.load_for(args)
    p = params.export
    name = args.name or args.model.parent.name
    reports = args.reports or Path("reports/export") / name
    started = time.monotonic()

    from imgpipe.training.models import seed_everything

    seed_everything(0)  # op determinism: Keras' side of the parity check is the same on every run
    import keras

    from imgpipe.records.read import DatasetError, load_arrays, record_image_size
    from imgpipe.training.evaluation import class_probabilities, evaluate
    from imgpipe.training.reports import dataset_version

    try:
        labels = json.loads((args.records / "labels.json").read_text())
        size = record_image_size(args.records)
        images, y_true = load_arrays(args.records, "val", size)
    except (OSError, json.JSONDecodeError, DatasetError) as exc:
        raise StageError(f"--records {args.records}: {exc}") from None
    try:
        model = keras.saving.load_model(args.model, compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds; the message is what matters
        raise StageError(f"--model {args.model}: cannot load ({str(exc).splitlines()[0]})") from None
    if tuple(model.input_shape[1:]) != (size, size, 3):
        raise StageError(f"--model {args.model} takes {model.input_shape[1:]} images, the records hold "
                         f"{(size, size, 3)}: train and export on the same pack.image_size")

    exported, dense = serving_model(model, len(labels))
    onnx_bytes = convert(exported, size, p.opset)

    import onnx

    graph = onnx.load_from_string(onnx_bytes)
    onnx.checker.check_model(graph)
    left = sorted({node.op_type for node in graph.graph.node} & TRAINING_OPS)
    if left:
        raise StageError(f"the ONNX graph of {args.model} still holds training-only ops: {', '.join(left)}")

    # Parity gate on the whole validation split.
    keras_probs = class_probabilities(np.asarray(model.predict(images.astype(np.float32), batch_size=p.batch_size,
                                                               verbose=0)))
    sess = session(onnx_bytes)
    onnx_probs = run_onnx(sess, images, p.batch_size)
    max_diff = float(np.max(np.abs(keras_probs - onnx_probs))) if len(images) else 0.0
    agreement = float(np.mean(keras_probs.argmax(1) == onnx_probs.argmax(1))) if len(images) else 1.0
    evaluation = evaluate(y_true, onnx_probs, labels)
    metrics = {
        "parity": {"images": len(images), "max_abs_diff": float(f"{max_diff:.2e}"), "top1_agreement": agreement,
                   "passed": bool(max_diff <= p.max_abs_diff and agreement == 1.0)},
        "accuracy": evaluation.accuracy, "macro_f1": evaluation.macro_f1,
        "class_activation_maps": dense is not None,
    }
    timings = {"onnx_images_per_second": images_per_second(sess, images[:256], p.batch_size)}

    files = {"model.onnx": onnx_bytes}
    if p.quantize:
        calibration, _ = load_arrays(args.records, "train", size)
        int8 = quantize(onnx_bytes, calibration[:p.calibration_images])
        int8_sess = session(int8)
        int8_probs = run_onnx(int8_sess, images, p.batch_size)
        int8_eval = evaluate(y_true, int8_probs, labels)
        metrics["int8"] = {"accuracy": int8_eval.accuracy, "macro_f1": int8_eval.macro_f1,
                           "accuracy_change": round(int8_eval.accuracy - evaluation.accuracy, 6),
                           "top1_agreement": float(np.mean(int8_probs.argmax(1) == onnx_probs.argmax(1)))}
        timings["int8_images_per_second"] = images_per_second(int8_sess, images[:256], p.batch_size)
        timings["int8_speedup"] = timings["int8_images_per_second"] / timings["onnx_images_per_second"]
        files["model.int8.onnx"] = int8

    pack = params.pack
    files["labels.json"] = (json.dumps(labels, indent=2) + "\n").encode()
    files["preprocess.json"] = (json.dumps({"image_size": size, "pad_color": list(pack.pad_color),
                                            "resample": pack.resample}, indent=2) + "\n").encode()
    if dense is not None:
        files["cam_weights.npy"] = npy(cam_kernel(dense, len(labels)))
    outputs = {PROBABILITIES: ["batch", len(labels)]}
    if dense is not None:
        outputs[FEATURES] = ["batch", *exported.outputs[1].shape[1:]]
    metadata = {
        "name": name,
        "version": sha256(onnx_bytes)[:12],  # content-derived: the same model always has the same version
        "dataset": dataset_version(args.records),
        "source": {"keras_model": args.model.name, "keras_model_sha256": sha256(args.model.read_bytes()),
                   "opset": p.opset},
        "input": {"name": INPUT, "shape": ["batch", size, size, 3], "dtype": "float32", "range": [0, 255]},
        "outputs": outputs,
        "metrics": {"accuracy": evaluation.accuracy, "macro_f1": evaluation.macro_f1},
    }
    files["metadata.json"] = (json.dumps(metadata, indent=2) + "\n").encode()
    write_text_atomic(reports / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if not metrics["parity"]["passed"]:  # no bundle for a model ONNX Runtime does not reproduce
        raise StageError(f"{args.model}: ONNX parity failed: max |keras - onnx| {max_diff:.2e} "
                         f"(allowed {p.max_abs_diff:g}), top-1 agreement {agreement:.4f} (needs 1.0)")
    write_folder_atomic(args.out, files)

    timings["seconds"] = round(time.monotonic() - started, 1)
    # Timings differ on every run: an untracked report, never a DVC output.
    write_text_atomic(args.timings or Path("logs") / f"export_{name}.json", json.dumps(timings, indent=2) + "\n")

    line = (f"{NAME}: {name}: parity on {len(images)} val images: max |keras - onnx| {max_diff:.1e}, "
            f"top-1 agreement {agreement:.3f}; accuracy {evaluation.accuracy:.3f}; "
            f"{timings['onnx_images_per_second']:.0f} images/s in ONNX Runtime")
    if "int8" in metrics:
        line += (f"; INT8 {timings['int8_speedup']:.2f}x faster, accuracy change "
                 f"{metrics['int8']['accuracy_change']:+.3f}")
    print(line + f"; bundle {args.out}")


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), NAME)
