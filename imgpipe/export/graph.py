"""Rewrites of the converted ONNX graph, each exact: what a runtime would otherwise compute
wrongly, what made two exports of one model differ in bytes, and what serving never needs.
ONNX and ONNX Runtime are imported only when used.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from imgpipe.files import sha256

# Ops that only make sense while training; none may survive into the serving graph.
TRAINING_OPS = {"Dropout", "RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial"}


def training_ops_left(model_bytes: bytes) -> list[str]:
    """The training-only ops the graph still holds, sorted, once ``onnx.checker`` has passed it."""
    import onnx

    graph = onnx.load_from_string(model_bytes)
    onnx.checker.check_model(graph)
    return sorted({node.op_type for node in graph.graph.node} & TRAINING_OPS)


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
