"""Neptune offline runs are written, read back by tools.compare, and never fail the caller."""

from __future__ import annotations

import logging

import pytest

from imgpipe.cli import StageError
from imgpipe.errors import ParamsError
from imgpipe.training.tracking import Tracker
from tests.test_compare_table import grid
from tools import compare


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEPTUNE_MODE", raising=False)
    for name in ("NEPTUNE_API_TOKEN", "NEPTUNE_DATA_DIRECTORY", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def record_run(name: str, lr: float, losses: list[float], val: tuple[float, float],
               test: tuple[float, float]) -> None:
    """A run as the trainers record it (imgpipe.training.reports.publish): (accuracy, macro-F1) of val and
    test apart, and the baseline guard's verdict (val macro-F1 at least 0.1 above the guess's 0.5)."""
    tracker = Tracker(name, tags=["test", name])
    assert tracker.active
    tracker.set("parameters", {"optimizer": {"lr": lr}, "epochs": len(losses), "head": "softmax"})
    tracker.set("data/version", "abc123")
    for epoch, loss in enumerate(losses):
        tracker.log("train/loss", loss, step=epoch)
    tracker.set("metrics", {
        "val": {"accuracy": val[0], "macro_f1": val[1], "baseline_macro_f1": 0.5},
        "test": {"accuracy": test[0], "macro_f1": test[1], "baseline_macro_f1": 0.5},
        "beats_baseline": val[1] >= 0.5 + 0.1, "best_epoch": len(losses), "epochs_run": len(losses)})
    tracker.stop()


def test_offline_runs_are_replayed_and_compared(workdir, capsys):
    record_run("slow", 0.01, [2.0, 1.5, 1.2], val=(0.56, 0.55), test=(0.53, 0.52))
    record_run("fast", 0.1, [2.0, 0.9, 0.4], val=(0.94, 0.93), test=(0.92, 0.91))
    runs = {r.name: r for r in compare.find_runs(workdir / ".neptune")}
    assert set(runs) == {"slow", "fast"}
    fast = runs["fast"]
    assert fast.tags == ["fast", "test"]
    assert fast.values["parameters/optimizer/lr"] == 0.1
    assert fast.values["parameters/epochs"] == 3
    assert fast.values["data/version"] == "abc123"
    assert fast.series["train/loss"] == [(0, 2.0), (1, 0.9), (2, 0.4)]
    assert compare.final_metrics(fast) == {
        "metrics/val/accuracy": 0.94, "metrics/val/macro_f1": 0.93, "metrics/val/baseline_macro_f1": 0.5,
        "metrics/test/accuracy": 0.92, "metrics/test/macro_f1": 0.91, "metrics/test/baseline_macro_f1": 0.5,
        "metrics/beats_baseline": True, "metrics/best_epoch": 3, "metrics/epochs_run": 3}

    capsys.readouterr()  # Neptune's own log lines so far
    compare.main(["--sort", "metrics/val/macro_f1", "--html", "curves.html"])
    out = capsys.readouterr().out
    # By default val and test side by side, and the guard's verdict; then what differs, under a short name.
    assert compare.DEFAULT_METRICS == ["metrics/val/accuracy", "metrics/test/accuracy", "metrics/val/macro_f1",
                                       "metrics/test/macro_f1", "metrics/beats_baseline"]
    header, fast_row, slow_row = grid(out)
    assert header == ["run", "id", "experiment", "val acc", "test acc", "val F1", "test F1", "beats", "lr"]
    assert "lr = parameters/optimizer/lr" in out  # parameters/head: the same in every run, no column
    assert fast_row[0] == "fast" and fast_row[3:] == ["0.94", "0.92", "0.93", "0.91", "yes", "0.1"]
    assert slow_row[0] == "slow" and slow_row[3:] == ["0.56", "0.53", "0.55", "0.52", "no", "0.01"]
    assert "fast" in (workdir / "curves.html").read_text()

    # Sorting follows the metric asked for: slow's test macro-F1 is lower, so --sort on it keeps fast first,
    # and the other final metrics are there on request.
    compare.main(["--sort", "metrics/test/macro_f1", "--metrics", "metrics/best_epoch", "metrics/val/macro_f1"])
    header, fast_row, _ = grid(capsys.readouterr().out)
    assert header[3:] == ["best_epoch", "val F1", "lr"]
    assert fast_row[0] == "fast" and fast_row[3:5] == ["3", "0.93"]
    compare.main(["--metrics", "all", "--wide"])
    header = grid(capsys.readouterr().out)[0]
    assert [key for key in header if key.startswith("metrics/")] == [
        *compare.DEFAULT_METRICS, *sorted(set(compare.final_metrics(fast)) - set(compare.DEFAULT_METRICS))]


def test_sorting_by_a_metric_no_run_has_is_a_clear_error(workdir):
    record_run("fast", 0.1, [1.0], val=(0.9, 0.9), test=(0.9, 0.9))
    with pytest.raises(ParamsError, match=r"--sort metrics/macro_f1: no run has this final metric .*metrics/val/"):
        compare.main(["--sort", "metrics/macro_f1"])  # the name before val and test were apart


def test_runs_of_dvc_experiments_land_in_the_repository_and_carry_the_experiment_name(workdir, monkeypatch, capsys):
    # What `dvc exp run` sets; a queued experiment runs in a temporary copy of the repository.
    repo, executor = workdir / "repo", workdir / "executor"
    executor.mkdir()
    monkeypatch.chdir(executor)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setenv("DVC_EXP_NAME", "lr-sweep-1")
    record_run("resnet50v2", 0.01, [1.0], val=(0.5, 0.5), test=(0.5, 0.5))
    assert not (executor / ".neptune").exists()
    (run,) = compare.find_runs(repo / ".neptune")
    assert run.experiment == "lr-sweep-1"
    capsys.readouterr()
    compare.main(["--neptune-dir", str(repo / ".neptune")])
    assert grid(capsys.readouterr().out)[1][2] == "lr-sweep-1"


def test_compare_without_runs_is_a_clear_error(workdir):
    with pytest.raises(StageError, match="no Neptune runs"):
        compare.main([])


def test_a_failing_tracker_warns_once_and_lets_the_caller_go_on(workdir, monkeypatch, caplog):
    monkeypatch.setenv("NEPTUNE_MODE", "async")  # needs a server and a token: neither exists here
    with caplog.at_level(logging.WARNING, logger="imgpipe.training.tracking"):
        tracker = Tracker("no-server")
        tracker.set("parameters", {"lr": 0.1})
        tracker.log("train/loss", 1.0)
        tracker.stop()
    assert not tracker.active
    warnings = [r for r in caplog.records if "Neptune is off" in r.getMessage()]
    assert len(warnings) == 1


def test_an_unknown_mode_is_a_warning_too(workdir, monkeypatch, caplog):
    monkeypatch.setenv("NEPTUNE_MODE", "cloud")
    with caplog.at_level(logging.WARNING, logger="imgpipe.training.tracking"):
        tracker = Tracker("typo")
    assert not tracker.active
    assert "NEPTUNE_MODE='cloud'" in caplog.text
