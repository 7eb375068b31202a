"""Experiment tracking in Neptune, offline by default; tracking trouble never stops training.

The hosted neptune.ai app shut down in March 2026, so runs are recorded in Neptune's offline
mode (``.neptune/offline/`` at the repository root, see :func:`data_directory`) unless
``NEPTUNE_MODE`` says otherwise (async, sync, offline, debug); ``NEPTUNE_PROJECT`` and
``NEPTUNE_API_TOKEN`` are passed on when set, for a self-hosted Neptune server.
``python -m tools.compare`` reads the offline runs back.

Layout of a run, which ``tools.compare`` relies on:
``parameters/...`` the training parameters, ``data/version`` the dataset hash, ``train/<name>``
per-epoch series, ``metrics/<name>`` final numbers, ``pictures/<name>`` images.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "local/image-pipeline"
MODES = {"async", "sync", "offline", "debug", "read-only"}


def neptune_mode() -> str:
    return os.environ.get("NEPTUNE_MODE", "offline")


def data_directory() -> Path:
    """Where offline runs are written: NEPTUNE_DATA_DIRECTORY when set, else ``.neptune`` at the
    root of the DVC repository running the stage (DVC_ROOT: queued ``dvc exp run`` executes in a
    temporary copy, and its runs would vanish with it), else ``.neptune`` here."""
    if os.environ.get("NEPTUNE_DATA_DIRECTORY"):
        return Path(os.environ["NEPTUNE_DATA_DIRECTORY"])
    return Path(os.environ.get("DVC_ROOT", ".")) / ".neptune"


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to 'a/b' keys; values Neptune cannot store (None, lists) become strings."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{path}/"))
        elif isinstance(value, bool | int | float | str):
            flat[path] = value
        else:
            flat[path] = str(value)
    return flat


def _init_run(neptune, **kwargs):  # type: ignore[no-untyped-def]
    """neptune.init_run with the data directory chosen here (the client reads it from the environment)."""
    before = os.environ.get("NEPTUNE_DATA_DIRECTORY")
    os.environ["NEPTUNE_DATA_DIRECTORY"] = str(data_directory())
    try:
        return neptune.init_run(**kwargs)
    finally:
        if before is None:
            os.environ.pop("NEPTUNE_DATA_DIRECTORY")
        else:
            os.environ["NEPTUNE_DATA_DIRECTORY"] = before


def import_neptune():  # type: ignore[no-untyped-def]
    """neptune-client, without its start-up lines: the package's deprecation notice (we use it on
    purpose, for its offline mode) and "Neptune initialized" (the stage's summary names the run).

    The notice is raised during the import, right after neptune puts an "always" filter first in
    line, so no warnings filter can stop it: the import's stderr is held and written back without it."""
    with contextlib.redirect_stderr(io.StringIO()) as held:
        import neptune
    for line in held.getvalue().splitlines():
        if "package has been deprecated" not in line:
            print(line, file=sys.stderr)
    if not log.isEnabledFor(logging.DEBUG):  # --verbose keeps neptune's info lines
        logging.getLogger("neptune").setLevel(logging.WARNING)
    return neptune


class Tracker:
    """One Neptune run. Every call is guarded: the first failure is logged once as a warning,
    tracking switches off, and the caller carries on."""

    def __init__(self, name: str, tags: list[str] | None = None, description: str = "") -> None:
        self.run = None
        self._warned = False
        mode = neptune_mode()
        try:
            if mode not in MODES:
                raise ValueError(f"NEPTUNE_MODE={mode!r} is not one of {sorted(MODES)}")
            neptune = import_neptune()
            self.run = _init_run(
                neptune,
                project=os.environ.get("NEPTUNE_PROJECT", DEFAULT_PROJECT),
                api_token=os.environ.get("NEPTUNE_API_TOKEN"),
                mode=mode, name=name, description=description, tags=tags or [],
                capture_hardware_metrics=False, capture_stdout=False, capture_stderr=False,
                capture_traceback=False, source_files=[],
            )
        except Exception as exc:  # a tracker that cannot start must not stop training
            self._fail(exc)
        if os.environ.get("DVC_EXP_NAME"):  # set by `dvc exp run`: `dvc exp show` lists this run by that name
            self.set("source/dvc_experiment", os.environ["DVC_EXP_NAME"])

    @classmethod
    def idle(cls) -> Tracker:
        """A tracker that starts no run and records nothing (a worker that is not the chief)."""
        tracker = cls.__new__(cls)
        tracker.run, tracker._warned = None, True
        return tracker

    @property
    def active(self) -> bool:
        return self.run is not None

    def _fail(self, exc: BaseException) -> None:
        if not self._warned:
            log.warning("tracking: Neptune is off for this run (%s: %s); training goes on", type(exc).__name__, exc)
            self._warned = True
        self.run = None

    def _guard(self, action):  # type: ignore[no-untyped-def]
        if self.run is None:
            return None
        try:
            return action(self.run)
        except Exception as exc:
            self._fail(exc)
            return None

    def set(self, path: str, value: Any) -> None:
        """Assign one value, or a (nested) dict of them under ``path``."""
        if isinstance(value, dict):
            for key, item in flatten(value).items():
                self.set(f"{path}/{key}", item)
            return
        self._guard(lambda run: run[path].assign(value))

    def log(self, path: str, value: float, step: float | None = None) -> None:
        """Append to a series (one point per epoch or per trial)."""
        self._guard(lambda run: run[path].append(float(value), step=step))

    def upload(self, path: str, file: Path) -> None:
        """Keep a copy of ``file`` in the run (offline: in its folder's upload_path/). A path alone
        would point at the workspace's file, which the next run or DVC experiment overwrites."""
        from neptune.types import File

        self._guard(lambda run: run[path].upload(File.from_content(file.read_bytes(), extension=file.suffix[1:])))

    def stop(self) -> None:
        self._guard(lambda run: run.stop())
        self.run = None
