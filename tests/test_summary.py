"""tools.summary (the end of `make demo`): val and test apart on every line, a model no better than
chance said loudly, and a missing report left out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgpipe.training.evaluation import side_by_side as stages_side_by_side
from tools import summary


def side_by_side(val: dict, test: dict) -> dict:
    """Metrics as the stages write them (their own transposition): each number with val and test side by side."""
    return stages_side_by_side({"val": val, "test": test})


def scores(accuracy: float, macro_f1: float, guess: float) -> dict:
    return {"accuracy": accuracy, "macro_f1": macro_f1, "baseline_accuracy": guess, "baseline_macro_f1": guess}


# The reports as the stages write them (the layout of issue 13).
REPORTS = {
    "download": {"total": 120, "kept": 100, "bytes": 2_500_000, "classes": 2, "dropped": 20,
                 "dropped_by_reason": {"not_an_image": 12, "duplicate": 8, "too_small": 0},
                 "kept_per_class": {"0": 50, "1": 50}},
    "pack": {"images": {"train": 70, "val": 20, "test": 10}, "skipped": 0, "classes": 2,
             "per_class": {"0": {"train": 35, "val": 10, "test": 5}, "1": {"train": 35, "val": 10, "test": 5}},
             "shards": {"train": 2, "val": 1, "test": 1}},
    "train_resnet": {**side_by_side(scores(0.55, 0.377, 0.5), scores(0.5, 0.333, 0.5)),
                     "beats_baseline": False, "baseline_margin": 0.1, "best_epoch": 1, "epochs_run": 6,
                     "head": "avg", "image_size": 64},
    "train_automl": {**side_by_side(scores(0.95, 0.949, 0.5), scores(0.9, 0.899, 0.5)),
                     "beats_baseline": True, "baseline_margin": 0.1, "best_epoch": 4, "epochs_run": 5,
                     "best_trial": 2, "trials_run": 3, "architecture": "resnet", "search_size": 3},
    "export/autokeras": {"parity": {"images": 20, "max_abs_diff": 2e-7, "top1_agreement": 1.0},
                         **side_by_side(scores(0.95, 0.949, 0.5), scores(0.9, 0.899, 0.5)),
                         "beats_baseline": True, "baseline_margin": 0.1, "class_activation_maps": True,
                         "int8": {**side_by_side(scores(0.9, 0.898, 0.5), scores(0.8, 0.79, 0.5)),
                                  "accuracy_change": -0.05, "top1_agreement": 0.95}},
    "export/resnet50v2": {"parity": {"images": 20, "max_abs_diff": 3e-6, "top1_agreement": 1.0},
                          **side_by_side(scores(0.55, 0.377, 0.5), scores(0.5, 0.333, 0.5)),
                          "beats_baseline": False, "baseline_margin": 0.1, "class_activation_maps": False},
    "serve": {"model": "autokeras", "version": "0123456789ab", "beats_baseline": True,
              **side_by_side({"images": 20, "http_accuracy": 0.95, "offline_accuracy": 0.95},
                             {"images": 10, "http_accuracy": 0.9, "offline_accuracy": 0.9}),
              "agreement_with_onnxruntime": 1.0, "max_abs_diff_onnxruntime": 1e-7},
}


def write_reports(root: Path, names: list[str]) -> None:
    for name in names:
        path = root / "reports" / name / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(REPORTS[name]))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_line_reports_val_and_test_apart(workdir, capsys):
    write_reports(workdir, list(REPORTS))
    summary.main()
    out = capsys.readouterr().out
    assert "pack: 70 train + 20 val + 10 test images in 2 classes, 2 + 1 + 1 TFRecord shards" in out
    lines = out.splitlines()
    automl = lines.index("autokeras: trial 2 of 3, best epoch 4 of 5 (chosen on val); "
                         "pictures in reports/train_automl/pictures/")
    assert lines[automl + 1:automl + 3] == [
        "  val  accuracy 0.950, macro-F1 0.949; weighted random guess: accuracy 0.500, macro-F1 0.500",
        "  test accuracy 0.900, macro-F1 0.899; weighted random guess: accuracy 0.500, macro-F1 0.500"]
    export = next(i for i, line in enumerate(lines) if line.startswith("export autokeras:"))
    assert lines[export].startswith("export autokeras: ONNX Runtime val accuracy 0.950, macro-F1 0.949; "
                                    "test accuracy 0.900, macro-F1 0.899")
    assert "INT8: val accuracy 0.900 (change -0.050" in lines[export + 2] and "test accuracy 0.800" in lines[export + 2]
    assert ("serve: autokeras (version 0123456789ab) over HTTP: val 20 images, accuracy 0.950 (offline 0.950); "
            "test 10 images, accuracy 0.900 (offline 0.900)") in out


def test_a_model_no_better_than_chance_is_said_loudly(workdir, capsys):
    write_reports(workdir, list(REPORTS))
    summary.main()
    lines = capsys.readouterr().out.splitlines()
    warnings = [i for i, line in enumerate(lines) if "NO BETTER THAN CHANCE" in line]
    # Under the trainer's and the export's lines of resnet50v2, and nowhere else.
    assert len(warnings) == 2
    assert lines[warnings[0] - 3].startswith("resnet50v2: best epoch 1 of 6")
    assert lines[warnings[0]] == ("  NO BETTER THAN CHANCE: val macro-F1 0.377 is not at least 0.10 above the "
                                  "weighted random guess's 0.500; `serve.model: best` will not serve this model")
    assert lines[warnings[1] - 2].startswith("export resnet50v2:")
    assert lines[warnings[1]] == lines[warnings[0]]


def test_a_served_model_that_fails_the_guard_is_flagged(workdir, capsys):
    write_reports(workdir, ["download", "serve"])
    report = workdir / "reports/serve/metrics.json"
    report.write_text(json.dumps({**REPORTS["serve"], "model": "resnet50v2", "beats_baseline": False}))
    summary.main()
    assert "  NO BETTER THAN CHANCE: the served model, resnet50v2, has a val macro-F1" in capsys.readouterr().out


def test_missing_reports_are_left_out(workdir, capsys):
    write_reports(workdir, ["download", "train_automl"])
    summary.main()
    out = capsys.readouterr().out
    assert out.startswith("download: 120 rows -> 100 images")
    assert "autokeras:" in out and "resnet50v2" not in out
    assert not any(line.startswith(("pack:", "export", "serve:")) for line in out.splitlines())

    (workdir / "reports/download/metrics.json").unlink()
    with pytest.raises(SystemExit, match="run `dvc repro` first"):
        summary.main()
