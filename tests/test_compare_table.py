"""python -m tools.compare's table: it fits the terminal, leads with the headline metrics, shows only
the parameters that differ, and filters and sorts; on real Neptune offline runs written by the Tracker."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from imgpipe.errors import ParamsError
from imgpipe.training.tracking import Tracker
from tools import compare
from tools.compare.table import short_names

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
TRAINERS = ("resnet", "automl")
# name, DVC experiment, the trainer's parameters changed, val (accuracy, macro-F1), test (accuracy, macro-F1):
# `dvc repro`, then a whole-pipeline experiment lr-high (both models) and a trainer-only lr-low.
RUNS = [("resnet50v2", "", {}, (0.90, 0.891234), (0.88, 0.87)),
        ("autokeras", "", {"tuner": "greedy"}, (0.93, 0.92), (0.91, 0.90)),
        ("resnet50v2", "lr-high", {"learning_rate": 0.003}, (0.95, 0.94), (0.93, 0.92)),
        ("autokeras", "lr-high", {"tuner": "bayesian", "batch_size": 64}, (0.85, 0.84), (0.86, 0.85)),
        ("resnet50v2", "lr-low", {"learning_rate": 0.0003, "batch_size": 32}, (0.15, 0.12), (0.14, 0.11))]
DIFFERING = {"automl.batch_size": "parameters/train/automl/batch_size", "tuner": "parameters/train/automl/tuner",
             "resnet.batch_size": "parameters/train/resnet/batch_size",
             "learning_rate": "parameters/train/resnet/learning_rate"}


def parameters(trainer: str, changes: dict) -> dict:
    """What a trainer records (imgpipe.training.reports.start_run): the shared sections and its own."""
    shared = {key: value for key, value in PARAMS["train"].items() if key not in TRAINERS}
    return {"augment": PARAMS["augment"], "image_size": 64,
            "train": {**shared, trainer: {**PARAMS["train"][trainer], **changes}}}


def record(env: pytest.MonkeyPatch, name: str, experiment: str, changes: dict,
           val: tuple[float, float] | None = None, test: tuple[float, float] = (0, 0)) -> None:
    """A run as the trainers record it, by `dvc exp run` when ``experiment`` is given; without ``val``, one
    stopped before its final metrics."""
    if experiment:
        env.setenv("DVC_EXP_NAME", experiment)
    else:
        env.delenv("DVC_EXP_NAME", raising=False)
    trainer = "resnet" if name == "resnet50v2" else "automl"
    tracker = Tracker(name, tags=["64px", name, changes.get("tuner", "softmax")])
    assert tracker.active
    tracker.set("parameters", parameters(trainer, changes))
    tracker.log("train/accuracy", 0.5, step=0)
    if val:
        tracker.set("metrics", {
            "val": {"accuracy": val[0], "macro_f1": val[1], "baseline_macro_f1": 0.1},
            "test": {"accuracy": test[0], "macro_f1": test[1], "baseline_macro_f1": 0.1},
            "beats_baseline": val[1] >= 0.1 + 0.1, "best_epoch": 3})
    tracker.stop()


@pytest.fixture(scope="module")
def neptune_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("runs") / ".neptune"
    with pytest.MonkeyPatch.context() as env:
        for name in ("NEPTUNE_MODE", "NEPTUNE_API_TOKEN", "DVC_ROOT", "DVC_EXP_NAME"):
            env.delenv(name, raising=False)
        env.setenv("NEPTUNE_DATA_DIRECTORY", str(folder))
        for run in RUNS:
            record(env, *run)
    return folder


def grid(text: str) -> list[list[str]]:
    """The table's header and rows as cells, cut where the dashed line under the header says (cells may
    be blank or hold spaces); the rows end at the first blank line."""
    lines = text.splitlines()
    spans = [match.span() for match in re.finditer(r"-+", lines[1])]
    cut = [(start, end if n < len(spans) - 1 else None) for n, (start, end) in enumerate(spans)]
    rows = [lines[0], *lines[2:lines.index("") if "" in lines else None]]
    return [[line[start:end].strip() for start, end in cut] for line in rows]


def compared(capsys, neptune_dir: Path, *flags: str) -> str:
    capsys.readouterr()
    compare.main(["--neptune-dir", str(neptune_dir), *flags])
    return capsys.readouterr().out


@pytest.fixture(autouse=True)
def terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # the width shutil.get_terminal_size reports


@pytest.mark.parametrize("width", [100, 160])
def test_the_default_table_fits_and_leads_with_the_headline_then_what_differs(neptune_dir, capsys, monkeypatch,
                                                                              width):
    monkeypatch.setenv("COLUMNS", str(width))
    text = compared(capsys, neptune_dir)
    assert max(map(len, text.splitlines())) <= width, text
    header, *rows = grid(text)
    assert header[:8] == ["run", "id", "experiment", "val acc", "test acc", "val F1", "test F1", "beats"]
    params = header[8:]
    assert params and set(params) <= set(DIFFERING), text  # image_size, augment...: the same everywhere
    assert [row[0] for row in rows] == [run[0] for run in RUNS]  # oldest first
    assert [row[2] for row in rows] == [run[1] for run in RUNS]
    assert rows[0][3:8] == ["0.9", "0.88", "0.8912", "0.87", "yes"]  # 4 significant digits
    assert rows[4][7] == "no"
    for short in params:  # the legend gives each short name its full path
        assert f"{short} = {DIFFERING[short]}" in text
    assert "val F1 = metrics/val/macro_f1" in text
    if width == 100:  # the rest did not fit: said, never wrapped
        assert len(params) < len(DIFFERING)
        assert f"{len(DIFFERING) - len(params)} more columns left out for the width (--wide or --transpose" in text
    else:
        assert params == list(DIFFERING)  # sorted by path: each trainer's together
        lr = header.index("learning_rate")
        assert [row[lr] for row in rows] == ["0.001", "", "0.003", "", "0.0003"]  # autokeras has no such thing


def test_wide_shows_every_column_under_its_full_name(neptune_dir, capsys):
    header, *rows = grid(compared(capsys, neptune_dir, "--wide"))
    everything = {key for run in compare.find_runs(neptune_dir) for key in run.values if key.startswith("parameters/")}
    assert header[:5] == ["run", "id", "created", "experiment", "tags"]
    assert everything <= set(header) and "parameters/train/resnet/min_steps" in header
    assert "metrics/val/accuracy" in header and "metrics/best_epoch" in header
    assert rows[0][4] == "64px,resnet50v2,softmax"


def test_transpose_puts_a_run_in_each_column(neptune_dir, capsys):
    names, *fields = grid(compared(capsys, neptune_dir, "--transpose"))
    assert names == ["run", *(run[0] for run in RUNS)]
    by_field = {row[0]: row[1:] for row in fields}
    assert list(by_field)[:7] == ["id", "experiment", *compare.DEFAULT_METRICS]
    assert set(list(by_field)[7:]) == set(DIFFERING.values())
    assert by_field["experiment"] == [run[1] for run in RUNS]
    assert by_field["parameters/train/automl/tuner"] == ["", "greedy", "", "bayesian", ""]


def test_params_and_metrics_choose_the_columns(neptune_dir, capsys, monkeypatch):
    header, *rows = grid(compared(capsys, neptune_dir, "--params", "resnet.learning_rate", "--metrics",
                                  "val/macro_f1", "metrics/best_epoch"))
    assert header == ["run", "id", "experiment", "val F1", "best_epoch", "learning_rate"]
    assert rows[2][3:] == ["0.94", "3", "0.003"]
    monkeypatch.setenv("COLUMNS", "300")
    header, *_ = grid(compared(capsys, neptune_dir, "--metrics", "all", "--params", "image_size"))
    assert header[3:8] == ["val acc", "test acc", "val F1", "test F1", "beats"]  # the headline first, then the rest
    assert header[8:] == ["best_epoch", "test.baseline_macro_f1", "val.baseline_macro_f1", "image_size"]
    with pytest.raises(ParamsError, match=r"--params dropout_rate: no run has this parameter \(there are: .*"
                                          r"parameters/train/resnet/dropout"):
        compared(capsys, neptune_dir, "--params", "dropout_rate")


def test_sort_puts_the_best_first(neptune_dir, capsys):
    _, *rows = grid(compared(capsys, neptune_dir, "--sort", "metrics/val/macro_f1"))
    assert [row[5] for row in rows] == ["0.94", "0.92", "0.8912", "0.84", "0.12"]
    _, *rows = grid(compared(capsys, neptune_dir, "--sort", "test/accuracy", "--model", "autokeras"))
    assert [(row[0], row[4]) for row in rows] == [("autokeras", "0.91"), ("autokeras", "0.86")]
    with pytest.raises(ParamsError, match=r"^--sort metrics/macro_f1: no run has this final metric \(there are: "
                                          r"metrics/beats_baseline, .*metrics/val/macro_f1\)$"):
        compared(capsys, neptune_dir, "--sort", "metrics/macro_f1")


@pytest.mark.parametrize(("flags", "expected"), [
    (["--model", "autokeras"], [("autokeras", ""), ("autokeras", "lr-high")]),
    (["--experiment", "lr-high"], [("resnet50v2", "lr-high"), ("autokeras", "lr-high")]),
    (["--experiment", "lr-high", "--experiment", "lr-low", "--model", "resnet50v2"],
     [("resnet50v2", "lr-high"), ("resnet50v2", "lr-low")]),
    (["--tag", "64px", "--tag", "greedy"], [("autokeras", "")]),
])
def test_filters_choose_the_runs(neptune_dir, capsys, flags, expected):
    _, *rows = grid(compared(capsys, neptune_dir, *flags))
    assert [(row[0], row[2]) for row in rows] == expected


@pytest.mark.parametrize(("flags", "message"), [
    (["--tag", "128px"], "--tag 128px: no run matches (there are: 64px, autokeras, bayesian, greedy, resnet50v2, "
                         "softmax)"),
    (["--model", "vgg16"], "--model vgg16: no run matches (there are: autokeras, resnet50v2)"),
    (["--model", "autokeras", "--experiment", "lr-low"],
     "--experiment lr-low: no run matches among the runs of --model autokeras (there are: lr-high)"),
])
def test_a_filter_that_leaves_no_run_says_which_and_what_there_is(neptune_dir, capsys, flags, message):
    with pytest.raises(ParamsError) as error:
        compared(capsys, neptune_dir, *flags)
    assert str(error.value) == message


def test_the_command_is_quiet_and_its_errors_are_one_line(neptune_dir):
    refused = subprocess.run([sys.executable, "-m", "tools.compare", "--neptune-dir", str(neptune_dir),
                              "--experiment", "lr-medium"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stdout == ""
    # That line only: no traceback, and not the client's deprecation notice, which it prints on import.
    assert refused.stderr == "compare: error: --experiment lr-medium: no run matches (there are: lr-high, lr-low)\n"


def test_an_unreadable_run_is_left_out_and_a_run_without_metrics_is_shown_blank(neptune_dir, tmp_path, monkeypatch,
                                                                                   capsys, caplog):
    damaged = shutil.copytree(neptune_dir, tmp_path / ".neptune")
    broken = sorted(damaged.glob("*/run__*"))[0]
    # A log the client cannot replay (a log merely cut short reads as a run stopped early: shown, and warned of).
    next(broken.glob("data-*.log")).write_text('{"obj": {"type": "AssignFloat"}, "version": 1}\n')
    monkeypatch.setenv("NEPTUNE_DATA_DIRECTORY", str(damaged))
    monkeypatch.delenv("NEPTUNE_MODE", raising=False)
    record(monkeypatch, "resnet50v2", "lr-killed", {"learning_rate": 0.01})  # stopped before its final metrics
    with caplog.at_level(logging.WARNING):
        _, *rows = grid(compared(capsys, damaged))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(str(broken) in message and "unreadable" in message for message in warnings), warnings
    killed = [row for row in rows if row[2] == "lr-killed"]
    assert len(killed) == 1 and killed[0][3:8] == ["", "", "", "", ""]
    assert any(f"run resnet50v2 {killed[0][1]} of experiment lr-killed has no final metrics" in message
               for message in warnings), warnings
    assert len(rows) == len(RUNS)  # one damaged left out, one without metrics added


def test_short_names_are_the_shortest_unambiguous_endings():
    keys = ["parameters/train/resnet/epochs", "parameters/train/automl/epochs", "parameters/train/resnet/seed",
            "metrics/best_epoch", "parameters/id"]
    assert short_names(keys, reserved=["run", "id"]) == {
        "parameters/train/resnet/epochs": "resnet.epochs", "parameters/train/automl/epochs": "automl.epochs",
        "parameters/train/resnet/seed": "seed", "metrics/best_epoch": "best_epoch", "parameters/id": "parameters.id"}


@pytest.mark.parametrize(("value", "text"), [(0.939474, "0.9395"), (0.0003, "0.0003"), (16.0, "16"), (1261, "1261"),
                                             (True, "yes"), (False, "no"), (None, ""), ("['vanilla']", "['vanilla']")])
def test_values_are_compact(value, text):
    assert compare.shown(value) == text


def test_the_table_is_still_called_as_the_notebook_calls_it(neptune_dir):
    runs = compare.find_runs(neptune_dir)
    assert "learning_rate" in compare.table([r for r in runs if "resnet50v2" in r.tags], "metrics/val/macro_f1", [])
