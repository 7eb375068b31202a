"""Neptune offline runs are written, read back by tools.compare, and never fail the caller."""

from __future__ import annotations

import logging

import pytest

from imgpipe.cli import StageError
from imgpipe.training.tracking import Tracker
from tools import compare


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEPTUNE_MODE", raising=False)
    for name in ("NEPTUNE_API_TOKEN", "NEPTUNE_DATA_DIRECTORY", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def record_run(name: str, lr: float, losses: list[float], f1: float) -> None:
    tracker = Tracker(name, tags=["test", name])
    assert tracker.active
    tracker.set("parameters", {"optimizer": {"lr": lr}, "epochs": len(losses), "head": "softmax"})
    tracker.set("data/version", "abc123")
    for epoch, loss in enumerate(losses):
        tracker.log("train/loss", loss, step=epoch)
    tracker.set("metrics/macro_f1", f1)
    tracker.stop()


def test_offline_runs_are_replayed_and_compared(workdir, capsys):
    record_run("slow", 0.01, [2.0, 1.5, 1.2], 0.71)
    record_run("fast", 0.1, [2.0, 0.9, 0.4], 0.93)
    runs = {r.name: r for r in compare.find_runs(workdir / ".neptune")}
    assert set(runs) == {"slow", "fast"}
    fast = runs["fast"]
    assert fast.tags == ["fast", "test"]
    assert fast.values["parameters/optimizer/lr"] == 0.1
    assert fast.values["parameters/epochs"] == 3
    assert fast.values["data/version"] == "abc123"
    assert fast.series["train/loss"] == [(0, 2.0), (1, 0.9), (2, 0.4)]
    assert compare.final_metrics(fast) == {"metrics/macro_f1": 0.93}

    capsys.readouterr()  # Neptune's own log lines so far
    compare.main(["--sort", "metrics/macro_f1", "--chart", "curves.html"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["run", "id", "created", "experiment", "tags"]
    assert "parameters/optimizer/lr" in lines[0] and "metrics/macro_f1" in lines[0]
    assert "parameters/head" not in lines[0]  # the same in every run: not a difference worth a column
    assert lines[2].startswith("fast") and "0.9300" in lines[2]
    assert lines[3].startswith("slow") and "0.7100" in lines[3]
    html = (workdir / "curves.html").read_text()
    assert "data:image/png;base64," in html and "fast" in html


def test_runs_of_dvc_experiments_land_in_the_repository_and_carry_the_experiment_name(workdir, monkeypatch, capsys):
    # What `dvc exp run` sets; a queued experiment runs in a temporary copy of the repository.
    repo, executor = workdir / "repo", workdir / "executor"
    executor.mkdir()
    monkeypatch.chdir(executor)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setenv("DVC_EXP_NAME", "lr-sweep-1")
    record_run("resnet50v2", 0.01, [1.0], 0.5)
    assert not (executor / ".neptune").exists()
    (run,) = compare.find_runs(repo / ".neptune")
    assert run.experiment == "lr-sweep-1"
    capsys.readouterr()
    compare.main(["--neptune-dir", str(repo / ".neptune")])
    assert capsys.readouterr().out.splitlines()[2].split()[3] == "lr-sweep-1"


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
