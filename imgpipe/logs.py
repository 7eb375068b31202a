"""Logs that show the pipeline's own lines: ``logging`` set up once per entry point, and
TensorFlow's C++ start-up chatter kept off the terminal.

TensorFlow's C++ log is off (``TF_CPP_MIN_LOG_LEVEL=3``): on a CPU machine it says "failed call
to cuInit" or "NodeDef mentions attribute use_unbounded_threadpool", which read as failures and
are not, and an error that matters reaches Python as an exception, which still shows. Its
start-up lines (oneDNN notice, "Could not find cuda drivers", CPU feature hints) are written to
file descriptor 2 before that level applies, so the first ``import tensorflow`` runs with the
descriptor captured, and every captured line that is not one of those notices is written back.
Standard library only: the service imports this too.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile
from types import ModuleType

VERBOSE_ENV = "IMGPIPE_VERBOSE"  # set to 1 for debug lines and TensorFlow's own start-up log
# Start-up notices that say nothing is wrong (I-lines are informational by definition).
STARTUP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|I\d{4} [\d:.]+ +\d+ \S+:\d+\] .*"  # absl's "I0000 00:00:1796158445.113240  23006 port.cc:153] ..."
    r"|To enable the following instructions: .*"
    r"|E\d{4} [\d:.]+ +\d+ cuda_platform\.cc:\d+\] failed call to cuInit: .*)$"
)


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def setup(verbose: bool = False) -> None:
    """Configure logging once, for an entry point: the pipeline's INFO lines as plain text,
    libraries' warnings and errors named by their logger; ``verbose`` (or IMGPIPE_VERBOSE=1)
    shows debug lines too."""
    verbose = verbose or verbose_from_env()
    handler = logging.StreamHandler()
    handler.setFormatter(PipelineFormatter())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("imgpipe").setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        _restore_tensorflow_log()


class PipelineFormatter(logging.Formatter):
    """The pipeline's lines as they are; other libraries' with their level and logger name."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.name.startswith("imgpipe") and record.levelno < logging.WARNING:
            return message
        return f"{record.levelname.lower()}: {record.name}: {message}"


def filtered_stderr_lines(text: str) -> list[str]:
    """The captured lines worth showing."""
    return [line for line in text.splitlines() if line.strip() and not STARTUP_NOISE.match(line)]


class _QuietLoader(importlib.abc.Loader):
    """Runs TensorFlow's own loader with descriptor 2 captured, then writes back what matters."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                self.loader.exec_module(module)
                module.config.list_physical_devices()  # the cuInit probe happens here, still captured
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                captured.seek(0)
                for line in filtered_stderr_lines(captured.read().decode("utf-8", "replace")):
                    print(line, file=sys.stderr)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: find the real spec without coming back here
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


_LOWERED_LEVEL = "3"


def _restore_tensorflow_log() -> None:
    """Undo ``quiet_tensorflow`` while TensorFlow is not imported yet (for --verbose)."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _QuietTensorFlowFinder)]
    if "tensorflow" not in sys.modules and os.environ.get("TF_CPP_MIN_LOG_LEVEL") == _LOWERED_LEVEL:
        del os.environ["TF_CPP_MIN_LOG_LEVEL"]


def quiet_tensorflow() -> None:
    """Lower TensorFlow's C++ log level and capture its start-up lines, before it is imported.
    Does nothing once TensorFlow is imported, or when IMGPIPE_VERBOSE=1 or TF_CPP_MIN_LOG_LEVEL
    is 0 or 1 (the user asked for TensorFlow's own log)."""
    if "tensorflow" in sys.modules or verbose_from_env():
        return
    if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = _LOWERED_LEVEL
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] in {"0", "1"}:
        return  # the user asked for TensorFlow's own log
    if not any(isinstance(finder, _QuietTensorFlowFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())
