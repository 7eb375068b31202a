"""The ResNet50V2 training stage on a tiny configuration: the sigmoid head, min_steps, the mirrored
strategy, starting from a weights file, clear errors. (Its outputs and Neptune run are checked on
the tiny pipeline's run in tests/test_demo_pipeline.py, its bit-identical reruns in
tests/test_train_resume.py.)"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from imgpipe.cli import StageError
from imgpipe.errors import ParamsError
from stages import train_resnet

ROOT = Path(__file__).resolve().parents[1]
PARAMS = """\
pack:
  image_size: 32
  processes: 1
train:
  resnet:
    epochs: 2
    batch_size: 8
    min_steps: 0
    patience: 0
"""


def train(workdir: Path, records: Path, name: str, *flags: str) -> Path:
    (workdir / "params.yaml").write_text(PARAMS)
    train_resnet.main(["--params", str(workdir / "params.yaml"), "--records", str(records),
                       "--out", str(workdir / name / "model"), "--reports", str(workdir / name / "reports"), *flags])
    return workdir / name


@pytest.mark.slow
def test_two_classes_train_a_sigmoid_head_for_at_least_min_steps(tmp_path, monkeypatch, records, caplog):
    # Bit-identical reruns, each in a process of its own, are proven by tests/test_train_resume.py.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEPTUNE_MODE", "debug")  # nothing written; tracking still exercised
    images = sum(json.loads((records[2].parent / "pack2.json").read_text())["per_class"][c]["train"]
                 for c in ("cat", "dog"))
    steps = -(-images // 8)  # batch_size 8: one pass
    caplog.set_level("INFO", logger="imgpipe")
    out = train(tmp_path, records[2], "run", "--epochs", "1", "--min-steps", str(2 * steps + 1))
    metrics = json.loads((out / "reports" / "metrics.json").read_text())
    assert metrics["head"] == "sigmoid" and 0 <= metrics["accuracy"]["val"] <= 1 and metrics["epochs_run"] == 1
    model = keras.models.load_model(out / "model" / "model.keras")
    assert model.output_shape == (None, 1)
    # Three passes over the small split in the one epoch: the optimizer made three passes' steps.
    assert int(model.optimizer.iterations) == 3 * steps
    assert f"{images} training images: each epoch is 3 passes, {3 * steps} steps in all" in caplog.text


@pytest.mark.parametrize(("steps_per_pass", "epochs", "min_steps", "passes"), [
    (9, 10, 250, 3),     # the small-data benchmark: 141 images at batch 16, 270 steps in all
    (79, 16, 250, 1),    # the demo: 1,261 images at batch 16 are already plenty
    (9, 10, 0, 1),       # 0 turns it off
    (9, 10, 90, 1),      # exactly enough with one pass
    (9, 10, 91, 2),
])
def test_passes_per_epoch_reach_min_steps(steps_per_pass, epochs, min_steps, passes):
    from imgpipe.training.resnet import passes_per_epoch

    assert passes_per_epoch(steps_per_pass, epochs, min_steps) == passes


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


@pytest.mark.slow
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
    assert "mirrored (MirroredStrategy) with 2 replica(s)" in result.stderr  # a log line
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and 0 <= metrics["accuracy"]["val"] <= 1
    assert keras.models.load_model(tmp_path / "model" / "model.keras").output_shape == (None, 3)


@pytest.mark.slow
def test_a_run_starts_from_saved_backbone_weights_and_bad_files_are_params_errors(tmp_path, monkeypatch, records):
    from imgpipe.training.models import backbone, build_resnet

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEPTUNE_MODE", "debug")
    # Base weights no run would start from: a fresh backbone, every weight moved off its initial
    # value (BN variances stay positive), so the test fails unless the file's weights are loaded.
    saved = backbone(build_resnet(32, 3))
    saved.set_weights([w * 1.01 + 0.001 for w in saved.get_weights()])
    weights = tmp_path / "weights" / "resnet50v2.weights.h5"
    weights.parent.mkdir()
    saved.save_weights(weights)

    # One epoch with the backbone frozen: only the new head learns, so the backbone is the file's.
    second = train(tmp_path, records[3], "second", "--weights", str(weights), "--freeze-epochs", "1",
                   "--epochs", "1")
    started = backbone(keras.models.load_model(second / "model" / "model.keras"))
    assert all(np.array_equal(a, b) for a, b in zip(started.get_weights(), saved.get_weights(), strict=True))
    assert json.loads((second / "reports" / "metrics.json").read_text())["weights"] == weights.name

    # Then the whole network trains on: one history, the epochs numbered on from the frozen ones.
    third = train(tmp_path, records[3], "third", "--weights", str(weights), "--freeze-epochs", "1", "--epochs", "2")
    history = list(csv.DictReader((third / "reports" / "history.csv").open()))
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert json.loads((third / "reports" / "metrics.json").read_text())["epochs_run"] == 2

    # A missing file through the command line (one line, exit code 2), a file of another network in-process.
    missing = tmp_path / "missing.weights.h5"
    result = subprocess.run([sys.executable, "-m", "stages.train_resnet", "--params", str(tmp_path / "params.yaml"),
                             "--records", str(records[3]), "--out", str(tmp_path / "bad"), "--reports",
                             str(tmp_path / "bad-reports"), "--weights", str(missing)],
                            cwd=ROOT, env={**os.environ, "NEPTUNE_MODE": "debug"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"train.resnet.weights: {missing}: no such file" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "bad").exists()
    other = tmp_path / "other.weights.h5"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save_weights(other)
    with pytest.raises(ParamsError, match=re.escape(f"train.resnet.weights: {other}: not ResNet50V2 base weights")):
        train(tmp_path, records[3], "other", "--weights", str(other))
    assert not (tmp_path / "other").exists()

