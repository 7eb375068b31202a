"""A copy of this project's pipeline files as a git repository, and DVC run in it with this
interpreter's environment: what the tests that run the real pipeline or inspect dvc.lock share."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FILES = ["dvc.yaml", "dvc.lock", "params.yaml", "data.dvc", ".dvcignore", ".dvc/config", ".dvc/.gitignore",
                  ".gitignore", "stages", "imgpipe", "serve", "tools", "notebooks"]


def copy_pipeline(repo: Path) -> Path:
    """A git repository holding this project's pipeline files (no data, no outputs)."""
    for name in PIPELINE_FILES:
        source, target = ROOT / name, repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return repo


def venv_env() -> dict[str, str]:
    """The environment with this interpreter's bin/ first on PATH (dvc.yaml's `python`, `dvc`)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def dvc(repo: Path, *args: str) -> str:
    result = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=repo, env=venv_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative path, with its bytes: two trees compare equal
    only when they hold the same files with the same contents."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
