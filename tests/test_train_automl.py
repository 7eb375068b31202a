"""The AutoKeras search stage on a tiny configuration: outputs, trials, tracking, portability, the
bounded search sample and the winner's training on the whole split, a killed search resumed, and
memory that does not grow with the split."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import keras
import numpy as np
import pytest

from imgpipe.cli import StageError
from imgpipe.records.read import balanced_sample, class_quotas, load_arrays, load_records_at, split_labels
from stages import pack, train_automl
from tests.test_pack import make_images
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


def with_search_images(count: int) -> str:
    return PARAMS + f"    search_images: {count}\n"


def search(workdir: Path, records: Path, name: str, params: str = PARAMS) -> Path:
    (workdir / "params.yaml").write_text(params)
    train_automl.main(["--params", str(workdir / "params.yaml"), "--records", str(records),
                       "--out", str(workdir / name / "model"), "--reports", str(workdir / name / "reports"),
                       "--workdir", str(workdir / "state")])
    return workdir / name


def stage_command(workdir: Path, records: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "stages.train_automl", "--params", str(workdir / "params.yaml"),
            "--records", str(records), "--out", str(workdir / name / "model"),
            "--reports", str(workdir / name / "reports"), "--workdir", str(workdir / "state")]


def stage_env(**env: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **env}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_search_outputs_trials_and_neptune_run(tmp_path, monkeypatch, records, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEPTUNE_MODE", raising=False)
    caplog.set_level("INFO", logger="imgpipe")
    out = search(tmp_path, records[3], "run")
    reports = out / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["head"] == "softmax" and metrics["image_size"] == 32 and metrics["search_size"] == 16
    assert metrics["trials_run"] == 2 and metrics["architecture"] == "vanilla"
    # The default search_images (2000) holds the whole tiny split: the searched model is kept.
    train_images = len(split_labels(records[3], "train"))
    assert metrics["retrained"] is False and metrics["search_images"] == train_images
    assert metrics["search_val_images"] == len(split_labels(records[3], "val"))
    assert "the search saw every training and validation image: keeping trial" in caplog.text
    assert not (tmp_path / "state").exists()  # a finished run removes its backup
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
    assert run.values["parameters/train/precision"] == "float32" and run.values["parameters/train/deterministic"]
    assert [step for step, _ in run.series["trials/score"]] == [0, 1]
    assert [step for step, _ in run.series["trials/0/train/val_loss"]] == [1, 2]
    assert len(run.values["data/version"]) == 64 and run.values["source/git_commit"]


@pytest.mark.slow
def test_a_sample_smaller_than_train_retrains_the_winner_on_the_whole_split(tmp_path, monkeypatch, records,
                                                                            caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEPTUNE_MODE", "debug")
    caplog.set_level("INFO", logger="imgpipe")
    out = search(tmp_path, records[3], "run", with_search_images(6))
    metrics = json.loads((out / "reports" / "metrics.json").read_text())
    train_images = len(split_labels(records[3], "train"))
    assert metrics["retrained"] is True and metrics["search_images"] == 6 and metrics["search_val_images"] == 6
    assert f"afresh on all {train_images} training images (the search saw 6)" in caplog.text
    history = list(csv.DictReader((out / "reports" / "history.csv").open()))
    assert [row["epoch"] for row in history] == ["1", "2"]  # the winner's own epochs, on the whole split
    assert min(history, key=lambda row: float(row["val_loss"]))["epoch"] == str(metrics["best_epoch"])

    # Saved in float32 with plain Keras layers: it loads without AutoKeras, and reproduces the
    # reported accuracies (computed on the streamed splits) from the arrays.
    check = ("import sys, json, keras, numpy as np\n"
             "from imgpipe.records.read import load_arrays\n"
             "model = keras.models.load_model(sys.argv[1])\n"
             "assert not [name for name in sys.modules if name.startswith('autokeras')]\n"
             "accuracy = {}\n"
             "for split in ('val', 'test'):\n"
             "    images, labels = load_arrays(sys.argv[2], split, 32)\n"
             "    accuracy[split] = float(np.mean(model.predict(images.astype(np.float32), verbose=0)"
             ".argmax(axis=1) == labels))\n"
             "print(json.dumps({'shape': model.output_shape, 'accuracy': accuracy}))\n")
    result = subprocess.run([sys.executable, "-c", check, str(out / "model" / "model.keras"), str(records[3])],
                            capture_output=True, text=True, timeout=300, env=stage_env())
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert loaded["shape"] == [None, 3]
    for split in ("val", "test"):
        assert loaded["accuracy"][split] == pytest.approx(metrics["accuracy"][split], abs=1e-6)


def test_the_search_sample_is_seeded_balanced_and_bounded():
    counts = [50, 7, 30]
    labels = np.repeat([0, 1, 2], counts)
    assert class_quotas(counts, 30) == [12, 7, 11]  # 10 each, and the short class's 3 go to the others
    assert class_quotas(counts, 200) == counts
    assert class_quotas([4, 4, 4], 10) == [3, 3, 4]
    for limit in (1, 2, 12, 21, 30, 86, 87):
        quotas = class_quotas(counts, limit)
        assert sum(quotas) == min(limit, sum(counts)) and all(q <= c for q, c in zip(quotas, counts, strict=True))
        # equal shares: a class that could give more has at most one image fewer than any other
        assert all(max(quotas) - q <= 1 for q, c in zip(quotas, counts, strict=True) if q < c)

    sample = balanced_sample(labels, 30, seed=42)
    assert len(sample) == 30 and len(set(sample)) == 30 and list(sample) == sorted(sample)
    assert np.bincount(labels[sample]).tolist() == class_quotas(counts, 30)
    assert np.array_equal(sample, balanced_sample(labels, 30, seed=42))  # deterministic
    assert not np.array_equal(sample, balanced_sample(labels, 30, seed=43))  # the seed decides
    assert np.array_equal(balanced_sample(labels, 87, seed=1), np.arange(87))  # all fit: all taken


def test_the_sample_is_read_from_the_labels_and_only_its_images_decoded(records):
    labels = split_labels(records[3], "train")
    all_images, all_labels = load_arrays(records[3], "train", 32)  # one shard: file order is evaluation order
    assert np.array_equal(labels, all_labels)
    chosen = balanced_sample(labels, 6, seed=7)
    images, sample_labels = load_records_at(records[3], "train", 32, chosen)
    assert np.bincount(sample_labels, minlength=3).tolist() == [2, 2, 2]
    assert np.array_equal(sample_labels, labels[chosen]) and np.array_equal(images, all_images[chosen])
    assert images.dtype == np.uint8 and images.shape == (6, 32, 32, 3)


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


@pytest.mark.slow
def test_a_killed_search_resumes_after_its_last_trial_and_ends_as_an_uninterrupted_one(tmp_path, records):
    """Two classes (sigmoid head), a sample smaller than train (so the winner is retrained): an
    uninterrupted run, then a run killed as trial 2 starts (with a broken tracker, which only
    warns), resumed: same model bytes, reports and Neptune series, and no backup left."""
    (tmp_path / "params.yaml").write_text(with_search_images(8))
    state = tmp_path / "state"
    first = subprocess.run(stage_command(tmp_path, records[2], "first"), cwd=tmp_path, capture_output=True,
                           text=True, timeout=600,
                           env=stage_env(NEPTUNE_MODE="offline", NEPTUNE_DATA_DIRECTORY=str(tmp_path / "nep1")))
    assert first.returncode == 0, first.stderr[-3000:]
    assert not state.exists()

    with tempfile.TemporaryFile() as stdout:
        killed = subprocess.Popen(stage_command(tmp_path, records[2], "second"), cwd=tmp_path, stdout=stdout,
                                  stderr=subprocess.PIPE, text=True, env=stage_env(NEPTUNE_MODE="no-such-mode"))
        seen = []
        for line in killed.stderr:
            seen.append(line)
            if "search trial 2 of 2" in line:
                killed.send_signal(signal.SIGKILL)
                break
        killed.wait(timeout=60)
        killed.stderr.close()
    assert killed.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    assert "tracking: Neptune is off for this run" in "".join(seen)  # warned, and the search went on
    assert len(list(state.iterdir())) == 1  # the backup of these inputs

    resumed = subprocess.run(stage_command(tmp_path, records[2], "second"), cwd=tmp_path, capture_output=True,
                             text=True, timeout=600,
                             env=stage_env(NEPTUNE_MODE="offline", NEPTUNE_DATA_DIRECTORY=str(tmp_path / "nep2")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming the search after trial 1 of 2 from {state}" in resumed.stderr
    assert "search trial 1 of 2" not in resumed.stderr and "search trial 2 of 2" in resumed.stderr
    assert not state.exists()

    one, two = tmp_path / "first", tmp_path / "second"
    metrics = json.loads((one / "reports" / "metrics.json").read_text())
    assert metrics["head"] == "sigmoid" and metrics["retrained"] is True
    assert sha256(one / "model" / "model.keras") == sha256(two / "model" / "model.keras")
    for name in ("metrics.json", "history.csv", "confusion.csv", "trials.csv"):
        assert (one / "reports" / name).read_bytes() == (two / "reports" / name).read_bytes(), name
    [run_one], [run_two] = compare.find_runs(tmp_path / "nep1"), compare.find_runs(tmp_path / "nep2")
    assert "trials/0/train/val_loss" in run_two.series and "train/val_loss" in run_two.series
    assert run_one.series == run_two.series  # trial 1's epochs came from the backup
    assert ({k: v for k, v in run_one.values.items() if k.startswith(("metrics/", "trials/"))}
            == {k: v for k, v in run_two.values.items() if k.startswith(("metrics/", "trials/"))})


# The memory test: two record sets alike but for the number of images, at a size where pixels weigh.
MEMORY_SIZE = 128  # 48 KB an image as uint8
MEMORY_PER_CLASS = {"small": 60, "large": 800}
MEMORY_PARAMS = """\
train:
  automl:
    max_trials: 1
    epochs: 1
    batch_size: 32
    patience: 0
    block_types: [vanilla]
    input_size: 16
    search_images: 60
"""
MEMORY_SLACK_MB = 24  # allocator and TensorFlow noise between two runs


def packed(root: Path, per_class: int) -> Path:
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(f"pack:\n  image_size: {MEMORY_SIZE}\n  shard_size: 200\n  processes: 2\n")
    make_images(root / "images", {name: per_class for name in ("cat", "dog", "owl")})
    pack.main(["--params", str(root / "params.yaml"), "--images", str(root / "images"), "--out", str(root / "tf"),
               "--report", str(root / "pack.json")])
    return root / "tf"


def peak_rss_mb(command: list[str], cwd: Path) -> float:
    """Peak resident memory of one child process (MB): ``wait4`` reports that child's own usage."""
    with tempfile.TemporaryFile() as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=cwd,
                                 env=stage_env(NEPTUNE_MODE="debug"))
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        if child.returncode:
            output.seek(0)
            pytest.fail(output.read().decode()[-3000:])
    return usage.ru_maxrss / 1024  # Linux counts kilobytes


@pytest.mark.slow
def test_the_search_memory_does_not_grow_with_the_split(tmp_path):
    """Two record sets alike but for their size, both larger than the search sample (so both
    retrain the winner, streamed): the stage's peak memory grows by the streamed input's shuffle
    buffer (tf.data holds up to 10,000 encoded training records, here the whole split) and by
    little else, far less than holding the splits' pixels would add."""
    peaks, pixels, encoded = {}, {}, {}
    for name, per_class in MEMORY_PER_CLASS.items():
        records = packed(tmp_path / name, per_class)
        images = sum(json.loads((tmp_path / name / "pack.json").read_text())["images"].values())
        pixels[name] = images * MEMORY_SIZE**2 * 3 / 2**20  # every split whole, uint8, as the search once held them
        encoded[name] = sum(path.stat().st_size for path in records.glob("train-*.tfrecord")) / 2**20
        (tmp_path / name / "params.yaml").write_text(MEMORY_PARAMS)
        peaks[name] = peak_rss_mb(stage_command(tmp_path / name, records, "run"), tmp_path / name)
        metrics = json.loads((tmp_path / name / "run" / "reports" / "metrics.json").read_text())
        assert metrics["search_images"] == 60 and metrics["retrained"] is True
    grown = peaks["large"] - peaks["small"] - (encoded["large"] - encoded["small"])
    loaded = pixels["large"] - pixels["small"]  # ~100 MB: what holding the large set's pixels adds at least
    assert loaded > 4 * MEMORY_SLACK_MB
    assert grown < MEMORY_SLACK_MB, {"peak MB": peaks, "pixels MB": pixels, "encoded train MB": encoded}
