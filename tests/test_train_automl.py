"""The AutoKeras search stage on a tiny configuration: outputs, trials, tracking, portability, reruns."""

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
from imgpipe.records.read import load_arrays
from stages import train_automl
from tools import compare

ROOT = Path(__file__).resolve().parents[1]
PARAMS = """\
train:
  automl:
    max_trials: 2
    epochs: 2
    batch_size: 8
    patience: 0
    block_types: [vanilla]
    input_size: 16
    fixed:
      image_block_1/normalize: true
"""


def search(workdir: Path, records: Path, name: str) -> Path:
    (workdir / "params.yaml").write_text(PARAMS)
    train_automl.main(["--params", str(workdir / "params.yaml"), "--records", str(records),
                       "--out", str(workdir / name / "model"), "--reports", str(workdir / name / "reports"),
                       "--workdir", str(workdir / "state")])
    return workdir / name


def run_cli(workdir: Path, records: Path, name: str, **env: str) -> subprocess.CompletedProcess:
    (workdir / "params.yaml").write_text(PARAMS)
    return subprocess.run(
        [sys.executable, "-m", "stages.train_automl", "--params", str(workdir / "params.yaml"),
         "--records", str(records), "--out", str(workdir / name / "model"),
         "--reports", str(workdir / name / "reports"), "--workdir", str(workdir / "state")],
        cwd=workdir, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True, timeout=600)


def test_search_outputs_trials_and_neptune_run(tmp_path, monkeypatch, records):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEPTUNE_MODE", raising=False)
    out = search(tmp_path, records[3], "run")
    reports = out / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["head"] == "softmax" and metrics["image_size"] == 32 and metrics["search_size"] == 16
    assert metrics["trials_run"] == 2 and metrics["architecture"] == "vanilla"
    per_class = json.loads((reports / "per_class.json").read_text())
    for split in ("val", "test"):
        assert 0 <= metrics["accuracy"][split] <= 1 and set(per_class[split]) == {"cat", "dog", "owl"}
    assert isinstance(metrics["beats_baseline"], bool)

    trials = list(csv.DictReader((reports / "trials.csv").open()))
    assert [row["trial"] for row in trials] == ["0", "1"] and {row["status"] for row in trials} == {"COMPLETED"}
    scores = [float(row["val_loss"]) for row in trials]
    assert min(scores) == pytest.approx(scores[metrics["best_trial"]])  # the best trial is the one kept
    for row in trials:
        values = json.loads(row["hyperparameters"])
        assert values["image_block_1/block_type"] == "vanilla"
        assert values["image_block_1/normalize"] is True  # pinned through train.automl.fixed
    history = list(csv.DictReader((reports / "history.csv").open()))
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert min(history, key=lambda row: float(row["val_loss"]))["epoch"] == str(metrics["best_epoch"])
    for picture in ("curves", "confusion", "confusion_test", "mistakes"):
        assert (reports / "pictures" / f"{picture}.png").read_bytes().startswith(b"\x89PNG")

    # The saved model takes pack-size images (resized inside) and reproduces the reported accuracies.
    model = keras.models.load_model(out / "model" / "model.keras")
    assert model.input_shape == (None, 32, 32, 3) and model.get_layer("resize").output.shape[1:3] == (16, 16)
    for split in ("val", "test"):
        images, labels = load_arrays(records[3], split, 32)
        predicted = model.predict(images.astype(np.float32), verbose=0).argmax(axis=1)
        assert np.mean(predicted == labels) == pytest.approx(metrics["accuracy"][split], abs=1e-6)

    runs = compare.find_runs(tmp_path / ".neptune")
    assert len(runs) == 1 and runs[0].name == "autokeras"
    run = runs[0]
    assert run.values["metrics/test/accuracy"] == pytest.approx(metrics["accuracy"]["test"])
    assert run.values["trials/1/hyperparameters/image_block_1/block_type"] == "vanilla"
    assert [step for step, _ in run.series["trials/score"]] == [0, 1]
    assert [step for step, _ in run.series["trials/0/train/val_loss"]] == [1, 2]
    assert len(run.values["data/version"]) == 64 and run.values["source/git_commit"]


def test_saved_model_loads_without_autokeras(tmp_path, monkeypatch, records):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEPTUNE_MODE", "debug")
    out = search(tmp_path, records[3], "run")
    check = ("import sys, keras; model = keras.models.load_model(sys.argv[1]); "
             "assert not [name for name in sys.modules if name.startswith('autokeras')]; print(model.output_shape)")
    result = subprocess.run([sys.executable, "-c", check, str(out / "model" / "model.keras")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(None, 3)" in result.stdout


@pytest.mark.slow
def test_two_classes_rerun_bit_identically_and_a_broken_tracker_changes_nothing(tmp_path, records):
    first = run_cli(tmp_path, records[2], "first", NEPTUNE_MODE="offline")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(tmp_path, records[2], "second", NEPTUNE_MODE="no-such-mode")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "tracking: Neptune is off for this run" in second.stderr  # warned, and training went on

    one, two = tmp_path / "first", tmp_path / "second"
    assert json.loads((one / "reports" / "metrics.json").read_text())["head"] == "sigmoid"
    assert (one / "model" / "model.keras").read_bytes() == (two / "model" / "model.keras").read_bytes()
    for name in ("metrics.json", "history.csv", "confusion.csv", "trials.csv"):
        assert (one / "reports" / name).read_bytes() == (two / "reports" / name).read_bytes(), name


def test_bad_records_and_bad_params_are_one_line_errors(tmp_path, records):
    (tmp_path / "params.yaml").write_text(PARAMS)
    with pytest.raises(StageError, match="labels.json"):
        train_automl.main(["--params", str(tmp_path / "params.yaml"), "--records", str(tmp_path / "nothing"),
                           "--out", str(tmp_path / "model")])
    (tmp_path / "params.yaml").write_text(PARAMS.replace("block_types: [vanilla]", "block_types: [efficient]"))
    result = subprocess.run([sys.executable, "-m", "stages.train_automl", "--params", str(tmp_path / "params.yaml"),
                             "--records", str(records[3]), "--out", str(tmp_path / "model")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.automl.block_types.0" in result.stderr and str(tmp_path / "params.yaml") in result.stderr
