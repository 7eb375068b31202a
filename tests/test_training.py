"""imgpipe/training/models.py: the model contract (scaling inside, named layers, heads) and determinism."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from imgpipe.training.models import build_resnet, class_weights, resolve_head, seed_everything

SIZE = 32


@pytest.mark.parametrize(("classes", "head", "units"), [(10, "auto", 10), (2, "auto", 1), (2, "softmax", 2)])
def test_heads_and_named_layers(classes, head, units):
    model = build_resnet(SIZE, classes, head)
    images = np.random.default_rng(0).uniform(0, 255, size=(3, SIZE, SIZE, 3)).astype("float32")
    outputs = model.predict(images, verbose=0)
    assert outputs.shape == (3, units)
    if units > 1:
        assert np.allclose(outputs.sum(axis=1), 1.0, atol=1e-5)
    assert all(0 <= p <= 1 for p in outputs.ravel())
    for name in ("scale", "features", "pool", "predictions"):
        model.get_layer(name)
    assert model.get_layer("features").output.shape[-1] == 2048


def test_the_model_scales_its_own_input():
    model = build_resnet(SIZE, 3)
    scaled = model.get_layer("scale")(tf.constant([[[[0.0, 127.5, 255.0]]]]))
    assert np.allclose(scaled.numpy().ravel(), [-1.0, 0.0, 1.0])


def test_head_rules():
    assert resolve_head("auto", 2) == "sigmoid" and resolve_head("auto", 5) == "softmax"
    with pytest.raises(ValueError, match="exactly two classes"):
        resolve_head("sigmoid", 3)
    with pytest.raises(ValueError, match="must be one of"):
        resolve_head("relu", 3)


def test_class_weights_balance_the_classes():
    weights = class_weights([10, 30, 0])
    assert weights[0] == pytest.approx(40 / (2 * 10)) and weights[1] == pytest.approx(40 / (2 * 30))
    assert weights[2] == 0.0
    assert 10 * weights[0] == pytest.approx(30 * weights[1])


def test_the_seed_decides_the_initial_weights():
    def initial(seed: int) -> list[np.ndarray]:
        seed_everything(seed)
        return build_resnet(SIZE, 3).get_weights()

    seven, seven_again, eight = initial(7), initial(7), initial(8)
    assert all(np.array_equal(a, b) for a, b in zip(seven, seven_again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(seven, eight, strict=True))
