"""Static INT8 quantisation of the exported graph (``model.int8.onnx``, ``export.quantize``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from imgpipe.export.convert import INPUT


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
