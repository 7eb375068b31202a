"""Keras -> ONNX: the serving model (named outputs, class-activation features), its conversion
to final ONNX bytes, and the class-activation kernel.

The ONNX graph takes ``image`` (float32 N x S x S x 3 in [0, 255], dynamic batch ``batch``) and
gives ``probabilities`` (N x classes) and, when the head is global pooling then dense,
``features`` (the last convolutional map). TensorFlow and tf2onnx are imported only when used.
"""

from __future__ import annotations

import io

import numpy as np

from imgpipe.export.graph import canonical, optimized, without_identity_reshapes, zero_padded_max_pools

INPUT, PROBABILITIES, FEATURES = "image", "probabilities", "features"


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
    # The producer name model.onnx has always carried: part of its bytes, so it stays as it was.
    proto.producer_name, proto.producer_version = "stages.export (tf2onnx)", tf2onnx.__version__
    zero_padded_max_pools(proto)
    return proto


def convert(exported, image_size: int, opset: int) -> bytes:  # type: ignore[no-untyped-def]
    """The serving model as final ONNX bytes: converted, optimised, canonically named."""
    return canonical(without_identity_reshapes(optimized(to_onnx(exported, image_size, opset).SerializeToString())))


def npy(array: np.ndarray) -> bytes:
    """``np.save`` bytes (no pickles, no timestamps: the same array gives the same bytes)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
