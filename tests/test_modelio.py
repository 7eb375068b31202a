"""imgpipe/training/modelio.py: an unchanged model saved twice, seconds apart, gives the same bytes and loads."""

from __future__ import annotations

import json
import time
import zipfile

import keras
import numpy as np

from imgpipe.training.modelio import save_model


def test_saving_twice_gives_identical_bytes_that_load(tmp_path):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])
    save_model(model, tmp_path / "first.keras")
    time.sleep(1.1 - time.time() % 1)  # the next save falls in another second, as model.save would record
    save_model(model, tmp_path / "second.keras")
    first = (tmp_path / "first.keras").read_bytes()
    assert first == (tmp_path / "second.keras").read_bytes()

    with zipfile.ZipFile(tmp_path / "first.keras") as archive:
        assert "date_saved" not in json.loads(archive.read("metadata.json"))
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    loaded = keras.models.load_model(tmp_path / "first.keras")
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    assert np.array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.keras", "second.keras"]  # no scratch left


def test_shared_object_ids_are_renumbered_by_first_appearance():
    from imgpipe.training.modelio import renumber_shared_objects

    config = {"a": {"shared_object_id": 140001}, "b": [{"shared_object_id": 139999}, {"shared_object_id": 140001}]}
    assert renumber_shared_objects(config) == {"a": {"shared_object_id": 0},
                                               "b": [{"shared_object_id": 1}, {"shared_object_id": 0}]}
