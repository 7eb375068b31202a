"""The ResNet50V2 training stage on a tiny configuration: outputs, tracking, bit-identical reruns."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from imgpipe.cli import StageError
from imgpipe.records.read import make_dataset
from stages import train_resnet
from tools import compare

ROOT = Path(__file__).resolve().parents[1]
PARAMS = """\
pack:
  image_size: 32
  processes: 1
train:
  resnet:
    epochs: 2
    batch_size: 8
    patience: 0
"""


def train(workdir: Path, records: Path, name: str, *flags: str) -> Path:
    (workdir / "params.yaml").write_text(PARAMS)
    train_resnet.main(["--params", str(workdir / "params.yaml"), "--records", str(records),
                       "--out", str(workdir / name / "model"), "--reports", str(workdir / name / "reports"), *flags])
    return workdir / name


def test_outputs_metrics_plots_pictures_and_neptune_run(tmp_path, monkeypatch, records):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEPTUNE_MODE", raising=False)
    out = train(tmp_path, records[3], "run")
    metrics = json.loads((out / "reports" / "metrics.json").read_text())
    assert metrics["head"] == "softmax" and metrics["image_size"] == 32
    assert 0 <= metrics["accuracy"] <= 1 and set(metrics["per_class"]) == {"cat", "dog", "owl"}
    assert metrics["epochs_run"] == 2 and metrics["best_epoch"] in (1, 2)
    history = list(csv.DictReader((out / "reports" / "history.csv").open()))
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history[0])
    best = min(history, key=lambda row: float(row["val_loss"]))
    assert int(best["epoch"]) == metrics["best_epoch"]  # the best epoch by validation loss is kept

    confusion = list(csv.DictReader((out / "reports" / "confusion.csv").open()))
    val = sum(v["val"] for v in json.loads((records[3].parent / "pack3.json").read_text())["per_class"].values())
    assert len(confusion) == val and set(confusion[0]) == {"actual", "predicted"}
    for picture in ("curves", "confusion", "mistakes"):
        assert (out / "reports" / "pictures" / f"{picture}.png").read_bytes().startswith(b"\x89PNG")

    # The saved model is the evaluated one: its predictions reproduce the reported accuracy.
    model = keras.models.load_model(out / "model" / "model.keras")
    val_data = make_dataset(records[3], "val", 8, 32, training=False)
    predicted = model.predict(val_data, verbose=0).argmax(axis=1)
    truth = np.concatenate([y.numpy() for _, y in val_data])
    assert np.mean(predicted == truth) == pytest.approx(metrics["accuracy"], abs=1e-6)

    runs = compare.find_runs(tmp_path / ".neptune")
    assert len(runs) == 1 and runs[0].name == "resnet50v2"
    assert runs[0].values["metrics/macro_f1"] == pytest.approx(metrics["macro_f1"])
    assert [step for step, _ in runs[0].series["train/val_loss"]] == [1, 2]
    assert len(runs[0].values["data/version"]) == 64


def test_two_classes_train_a_sigmoid_head(tmp_path, monkeypatch, records):
    # Bit-identical reruns are proven across processes by `dvc repro -f` in test_demo_pipeline.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEPTUNE_MODE", "debug")  # nothing written; tracking still exercised
    out = train(tmp_path, records[2], "run", "--epochs", "1")
    metrics = json.loads((out / "reports" / "metrics.json").read_text())
    assert metrics["head"] == "sigmoid" and 0 <= metrics["accuracy"] <= 1
    assert keras.models.load_model(out / "model" / "model.keras").output_shape == (None, 1)


def test_bad_records_and_a_head_that_cannot_fit_are_clear_errors(tmp_path, records):
    import shutil

    (tmp_path / "params.yaml").write_text(PARAMS)
    base = ["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "model")]
    with pytest.raises(StageError, match="labels.json"):
        train_resnet.main([*base, "--records", str(tmp_path / "nothing-here")])

    broken = tmp_path / "broken"
    shutil.copytree(records[3], broken)
    shard = sorted(broken.glob("val-*.tfrecord"))[0]
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(StageError, match=f"{shard}: corrupt or truncated"):
        train_resnet.main([*base, "--records", str(broken)])

    result = subprocess.run([sys.executable, "-m", "stages.train_resnet", *base, "--records", str(records[3]),
                             "--head", "sigmoid"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "train_resnet: error: " in result.stderr and "exactly two classes, the data has 3" in result.stderr
    assert "Traceback" not in result.stderr


def test_mirrored_strategy_trains_on_two_logical_cpu_devices(tmp_path, records):
    # Logical devices must exist before TensorFlow starts, hence a fresh interpreter.
    script = (
        "import sys, tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "from imgpipe.cli import run\n"
        "from stages import train_resnet\n"
        "run(lambda: train_resnet.main(sys.argv[1:]), 'train_resnet')\n"
    )
    (tmp_path / "params.yaml").write_text(PARAMS)
    result = subprocess.run(
        [sys.executable, "-c", script, "--params", str(tmp_path / "params.yaml"), "--records", str(records[3]),
         "--out", str(tmp_path / "model"), "--reports", str(tmp_path / "reports"), "--strategy", "mirrored",
         "--epochs", "1"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "NEPTUNE_MODE": "debug"},
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MirroredStrategy with 2 replica(s)" in result.stderr  # a log line
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and 0 <= metrics["accuracy"] <= 1
    assert keras.models.load_model(tmp_path / "model" / "model.keras").output_shape == (None, 3)
