"""The demo data and the DVC pipeline, run for real with DVC in a temporary copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools import demo_data

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FILES = ["dvc.yaml", "dvc.lock", "params.yaml", "data.dvc", ".dvcignore", ".dvc/config", ".dvc/.gitignore",
                  "stages", "tools"]


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_demo_data_regenerates_byte_identical(tmp_path):
    demo_data.main(["--out", str(tmp_path / "one")])
    demo_data.main(["--out", str(tmp_path / "two")])
    one = tree(tmp_path / "one")
    assert one == tree(tmp_path / "two")
    assert len([name for name in one if name.startswith(("images/", "local/"))]) == 1797
    formats = {name.rsplit(".", 1)[-1] for name in one}
    assert formats == {"png", "jpg", "csv"}


def test_demo_data_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit, match="exists; pass --force"):
        demo_data.main(["--out", str(tmp_path / "data")])


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC repository holding this project's pipeline files and freshly generated demo data."""
    repo = tmp_path_factory.mktemp("repo")
    for name in PIPELINE_FILES:
        source, target = ROOT / name, repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    demo_data.main(["--out", str(repo / "data")])
    return repo


def dvc(repo: Path, *args: str) -> str:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([str(bin_dir / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_generated_data_matches_data_dvc(repo):
    # What `make data` does on a fresh clone: generate, then cache it under the committed hash.
    dvc(repo, "add", "-q", "data")
    assert (repo / "data.dvc").read_bytes() == (ROOT / "data.dvc").read_bytes()
    assert "up to date" in dvc(repo, "status", "data.dvc")


def test_repro_reproduces_the_committed_lock_and_is_stable(repo):
    committed = (ROOT / "dvc.lock").read_text()
    dvc(repo, "repro")
    assert (repo / "dvc.lock").read_text() == committed, (
        "a fresh `dvc repro` gives another dvc.lock than the committed one: "
        "run `dvc repro` and commit dvc.lock after changing a stage"
    )
    images = tree(repo / "build/images")
    assert len(images) == 1797

    dvc(repo, "repro", "-f")
    assert (repo / "dvc.lock").read_text() == committed
    assert tree(repo / "build/images") == images
    assert "up to date" in dvc(repo, "status")
    assert "Running stage" not in dvc(repo, "repro")
