"""params.yaml plus the data set's own data/params.yaml: which wins, and errors that name the file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from imgpipe import params as params_module
from imgpipe.params import Params, ParamsError, load

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


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"download.workers": 32, ...}: every key of a nested section, dotted."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_params_yaml_lists_every_parameter_with_the_code_default():
    """params.yaml is where users read the defaults: each key is there, with the value the
    parameter models fall back to, so the file and the code cannot drift apart again."""
    written = _leaves(yaml.safe_load((ROOT / "params.yaml").read_text()))
    defaults = _leaves(Params().model_dump())
    assert sorted(written) == sorted(defaults)
    assert {key: value for key, value in written.items() if value != defaults[key]} == {}


def test_the_service_and_the_serve_section_share_their_defaults(tmp_path):
    """`python -m serve`, serve.settings.Settings and params.yaml's serve: start from one definition;
    the flags only override (None when not given), so the bundle's settings.json can count."""
    from imgpipe.bundle import BUNDLE_SETTINGS, SERVING
    from serve.__main__ import parse_args
    from serve.settings import Settings, resolve

    flags = vars(parse_args([]))
    settings, resolved = Settings(bundle=Path(".")), resolve(tmp_path)  # a bundle without settings.json
    serve_section = Params().serve
    for name in BUNDLE_SETTINGS:
        assert getattr(settings, name) == getattr(resolved, name) == getattr(serve_section, name) \
            == getattr(SERVING, name)
        assert flags[name] is None
    for name in ("max_batch_images", "threads", "workers", "precision", "upload_timeout"):
        assert getattr(settings, name) == getattr(resolved, name) == getattr(SERVING, name)
    assert resolved.remote.timeout == SERVING.remote_timeout and flags["drain_seconds"] == SERVING.drain_seconds


def test_splits_that_leave_no_training_images_are_one_line_errors(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("pack:\n  val_fraction: 0.6\n  test_fraction: 0.4\n")
    with pytest.raises(ParamsError) as raised:
        load([path])
    assert str(raised.value) == (f"{path}: pack: val_fraction + test_fraction must be below 1, so that some images "
                                 "train (got 0.6 + 0.4)")
    path.write_text("pack:\n  test_fraction: 0\n")
    with pytest.raises(ParamsError, match=r"pack\.test_fraction: input should be greater than 0"):
        load([path])


def test_a_negative_min_steps_flag_is_a_one_line_params_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  resnet:\n    epochs: 2\n")
    parser = argparse.ArgumentParser()
    params_module.add_section_flags(parser, "train.resnet")
    off = params_module.load_for(parser.parse_args(["--params", str(path), "--min-steps", "0"]))
    assert off.train.resnet.min_steps == 0 and off.train.resnet.epochs == 2
    with pytest.raises(ParamsError) as raised:
        params_module.load_for(parser.parse_args(["--params", str(path), "--min-steps", "-1"]))
    assert str(raised.value) == (f"{path}: train.resnet.min_steps: input should be greater than or equal to 0 "
                                 "(got -1)")
