"""tools.release names val and test accuracy, releases a model no better than chance with a loud
warning (the serve stage already decided), and refuses a bundle without the val/test metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tools import release

REPO = Path(__file__).resolve().parent.parent


def repository(tmp_path: Path, bundle: Path, **metrics) -> Path:  # type: ignore[no-untyped-def]
    """A git + DVC repository holding ``bundle`` as build/serving/, its metadata's metrics updated."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=repo, check=True, capture_output=True)
    serving = repo / "build" / "serving"
    shutil.copytree(bundle, serving)
    metadata = json.loads((serving / "metadata.json").read_text())
    metadata["metrics"].update(metrics)
    (serving / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return repo


def test_release_names_val_and_test_accuracy(tmp_path, bundles, monkeypatch, capsys):
    repo = repository(tmp_path, bundles["cam"], beats_baseline=True)
    metadata = json.loads((repo / "build/serving/metadata.json").read_text())
    val, test = metadata["metrics"]["val"], metadata["metrics"]["test"]
    monkeypatch.chdir(repo)
    release.main([])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"release: cam version {metadata['version']} "
                               f"(accuracy val {val['accuracy']:.3f}, test {test['accuracy']:.3f}) is in model/")
    assert not any("NO BETTER THAN CHANCE" in line for line in lines)
    assert (repo / "model.dvc").is_file()


def test_a_model_no_better_than_chance_is_released_with_a_loud_warning(tmp_path, bundles, monkeypatch, capsys):
    repo = repository(tmp_path, bundles["cam"], beats_baseline=False)
    monkeypatch.chdir(repo)
    release.main([])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("  WARNING, NO BETTER THAN CHANCE: val macro-F1 ")
    assert "released anyway" in lines[1]
    assert (repo / "model" / "metadata.json").is_file() and (repo / "model.dvc").is_file()


def test_a_bundle_without_val_and_test_metrics_is_refused_in_one_line(tmp_path, bundles):
    repo = repository(tmp_path, bundles["cam"])
    metadata_path = repo / "build/serving/metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["metrics"] = {"accuracy": 0.9, "macro_f1": 0.9}  # the layout before the test split
    metadata_path.write_text(json.dumps(metadata))
    result = subprocess.run([sys.executable, "-m", "tools.release", "--bundle", str(repo / "build/serving"),
                             "--out", str(repo / "model")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{metadata_path}: metrics lack val, test, beats_baseline, baseline_margin" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (repo / "model").exists()
