"""train.precision and train.deterministic: mixed bfloat16 trains, saves float32 and exports; the switches."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from tests.test_train_resnet import train


@pytest.mark.slow
def test_mixed_bfloat16_trains_saves_float32_and_passes_the_export_parity_gate(tmp_path, monkeypatch, records, caplog):
    from tests.conftest import export_bundle

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEPTUNE_MODE", "debug")
    caplog.set_level("WARNING", logger="imgpipe")
    out = train(tmp_path, records[3], "run", "--epochs", "1", "--precision", "mixed_bfloat16",
                "--no-deterministic")
    assert "precision" not in caplog.text  # a sound combination: no warning
    model = keras.models.load_model(out / "model" / "model.keras")
    assert {layer.dtype_policy.name for layer in model._flatten_layers()} == {"float32"}  # noqa: SLF001
    bundle = export_bundle(model, records[3], tmp_path / "export", "bf16")  # raises if parity fails
    parity = json.loads((tmp_path / "export" / "reports" / "bf16" / "metrics.json").read_text())["parity"]
    assert parity["passed"] and (bundle / "model.onnx").is_file()


def test_precision_and_determinism_switches():
    import tensorflow as tf
    from tensorflow.python.framework import config

    from imgpipe.training.models import build_resnet, float32_copy, seed_everything, set_precision

    try:
        seed_everything(1, deterministic=False)
        assert not config.is_op_determinism_enabled()
        seed_everything(1, deterministic=True)
        assert config.is_op_determinism_enabled()
        if not tf.config.list_logical_devices("GPU"):
            assert "mixed_float16 on a machine without a GPU" in set_precision("mixed_float16")
        assert set_precision("mixed_bfloat16") is None
        mixed = build_resnet(32, 3)
        assert mixed.get_layer("resnet50v2").compute_dtype == "bfloat16"
    finally:
        set_precision("float32")
    copy = float32_copy(mixed)
    assert {layer.dtype_policy.name for layer in copy._flatten_layers()} == {"float32"}  # noqa: SLF001
    assert all(np.array_equal(a, b) for a, b in zip(copy.get_weights(), mixed.get_weights(), strict=True))
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    # The same weights: bfloat16 compute (8 bits of mantissa) only rounds the outputs a little.
    assert np.abs(copy.predict(images, verbose=0) - mixed.predict(images, verbose=0)).max() < 0.05
