"""params.yaml plus the data set's own data/params.yaml: which wins, and errors that name the file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from imgpipe import params as params_module
from imgpipe.params import ParamsError, load

ROOT = Path(__file__).resolve().parents[1]


def test_the_data_settings_win_and_an_empty_one_leaves_params_yaml_alone(tmp_path):
    base = tmp_path / "params.yaml"
    base.write_text("pack:\n  image_size: 224\n  seed: 7\ntrain:\n  resnet:\n    epochs: 10\n")
    overlay = tmp_path / "data.yaml"
    overlay.write_text("pack:\n  image_size: 96\ntrain:\n  resnet:\n    epochs: 4\n")
    merged = load([base, overlay])
    assert merged.pack.image_size == 96 and merged.pack.seed == 7 and merged.train.resnet.epochs == 4
    overlay.write_text("# nothing for this data set\n")
    assert load([base, overlay]).pack.image_size == 224


def test_the_repository_defaults_and_the_demo_settings(tmp_path):
    from tools.demo_data import DEMO_PARAMS

    assert load(ROOT / "params.yaml").pack.image_size == 224  # users' own photos
    (tmp_path / "demo.yaml").write_text(DEMO_PARAMS)
    assert load([ROOT / "params.yaml", tmp_path / "demo.yaml"]).pack.image_size == 64


def test_errors_name_the_file_that_holds_the_bad_key(tmp_path, monkeypatch):
    base = tmp_path / "params.yaml"
    base.write_text("pack:\n  image_size: 224\n")
    overlay = tmp_path / "data.yaml"
    overlay.write_text("pack:\n  image_sise: 96\n")
    with pytest.raises(ParamsError, match=rf"^{overlay}: pack.image_sise: unknown key$"):
        load([base, overlay])
    monkeypatch.chdir(tmp_path)  # no data/params.yaml here
    with pytest.raises(ParamsError, match=r"^data/params.yaml: file not found \(an empty file means params.yaml alone"):
        load([base, Path("data/params.yaml")])


def test_flags_override_both_files(tmp_path):
    base = tmp_path / "params.yaml"
    base.write_text("train:\n  automl:\n    max_trials: 10\n")
    overlay = tmp_path / "data.yaml"
    overlay.write_text("train:\n  automl:\n    max_trials: 3\n")
    parser = argparse.ArgumentParser()
    params_module.add_section_flags(parser, "train.automl")
    args = parser.parse_args(["--params", str(base), str(overlay), "--max-trials", "2"])
    assert params_module.load_for(args).train.automl.max_trials == 2
    args = parser.parse_args(["--params", str(base), str(overlay)])
    assert params_module.load_for(args).train.automl.max_trials == 3
