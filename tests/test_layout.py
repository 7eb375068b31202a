"""The layout's rules, computed from the code: every stage depends in dvc.yaml on each project file
it imports (so a change there reruns it), imports point one way (stages -> imgpipe, serve ->
the TensorFlow-free corner of imgpipe), and stages/ holds only the stages dvc.yaml runs."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

from tests.pipeline import copy_pipeline, dvc

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("imgpipe", "stages", "serve", "tools")  # the project's own top-level packages
# What the service may use of the library: no TensorFlow, Keras, DVC or AutoKeras behind any of them.
SERVICE_LIBRARY = {"imgpipe/__init__.py", "imgpipe/bundle.py", "imgpipe/cli.py", "imgpipe/deadline.py",
                   "imgpipe/errors.py", "imgpipe/files.py", "imgpipe/images.py", "imgpipe/logs.py"}
TRAINING_STACK = {"tensorflow", "keras", "autokeras", "keras_tuner", "tf2onnx", "dvc", "neptune"}


def module_file(name: str) -> Path | None:
    """The project file that defines module ``name`` (a package's ``__init__.py``), if any."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports anywhere (lazy imports inside functions too), resolved to
    absolute names; ``from pkg import name`` counts ``pkg.name`` when that is a module."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}"))
    return found


def with_parents(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def closure(module: str) -> tuple[set[str], set[str]]:
    """(project files, third-party top-level packages) that importing ``module`` can reach."""
    files: set[str] = set()
    external: set[str] = set()
    todo = [module]
    while todo:
        for name in with_parents(todo.pop()):
            if name.split(".")[0] not in PACKAGES:
                external.add(name.split(".")[0])
                continue
            path = module_file(name)
            if path is None:
                continue  # a name imported from a module, not a module
            relative = path.relative_to(ROOT).as_posix()
            if relative not in files:
                files.add(relative)
                todo.extend(imported_modules(path))
    return files, external


def dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages, ``foreach`` expanded the way DVC names them (``export@resnet50v2``)."""
    stages = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        if "foreach" not in stage:
            stages[name] = stage
            continue
        for item in stage["foreach"]:
            text = yaml.safe_dump(stage["do"]).replace("${item}", str(item))
            stages[f"{name}@{item}"] = yaml.safe_load(text)
    return stages


def entry_module(cmd: str) -> str:
    match = re.search(r"python -m ([\w.]+)", cmd)
    assert match, f"not a `python -m` command: {cmd}"
    return match.group(1)


STAGES = dvc_stages()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_imported_project_file_is_a_dependency_of_the_stage(stage):
    deps = [dep.rstrip("/") for dep in STAGES[stage]["deps"]]
    files, _ = closure(entry_module(STAGES[stage]["cmd"]))
    uncovered = sorted(f for f in files if not any(f == dep or f.startswith(dep + "/") for dep in deps))
    assert uncovered == [], f"{stage} imports these, but dvc.yaml does not list them in its deps"
    for dep in deps:  # code the stage lists exists (data and build/ outputs may not be there yet)
        if dep.split("/")[0] in PACKAGES:
            assert (ROOT / dep).exists(), f"{stage}: dependency {dep} does not exist"


def test_the_committed_lock_records_the_committed_code_and_params(tmp_path):
    """dvc.lock holds the hash of every file and parameter each stage ran with. One edited without
    `dvc repro` leaves its stages stale: a clone would rerun them, and the released bundle would
    name code it was not built from. Checked on a copy of the pipeline files alone, so what DVC
    finds changed there is code or params (data and outputs are absent, which DVC calls deleted)."""
    status = json.loads(dvc(copy_pipeline(tmp_path), "status", "--json"))
    stale = {f"{stage} {dep}": change for stage, entries in status.items() for entry in entries
             for dep, change in entry.get("changed deps", {}).items() if change != "deleted"}
    assert stale == {}, "changed since dvc.lock was written: run `dvc repro` and commit dvc.lock"


def test_the_closure_follows_lazy_imports_and_parent_packages():
    files, external = closure("stages.export")
    assert {"stages/__init__.py", "stages/export.py", "imgpipe/__init__.py", "imgpipe/params.py"} <= files
    assert "tf2onnx" in external  # imported inside a function, still a dependency


def test_stages_holds_only_the_entry_points_dvc_yaml_runs():
    run = {entry_module(stage["cmd"]) for stage in STAGES.values()}
    present = {f"stages.{path.stem}" for path in (ROOT / "stages").glob("*.py") if path.stem != "__init__"}
    assert present == run


def test_imports_point_one_way():
    for path in sorted((ROOT / "imgpipe").rglob("*.py")):
        reached = {name.split(".")[0] for name in imported_modules(path)}
        assert not reached & {"stages", "tools", "tests", "bench"}, f"{path.relative_to(ROOT)} imports upwards"


@pytest.mark.parametrize("entry", ["serve.__main__", "serve.app", "serve.predict_folder"])
def test_the_service_uses_only_the_tensorflow_free_corner_of_the_library(entry):
    files, external = closure(entry)
    library = {f for f in files if f.startswith("imgpipe/")}
    assert library <= SERVICE_LIBRARY
    assert not external & TRAINING_STACK
