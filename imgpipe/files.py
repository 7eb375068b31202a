"""Writing files so that a crash never leaves a partial one: single files, CSV reports, whole folders.

Temporary files live in a scratch folder outside the outputs and are renamed into place, so
a SIGKILL at any moment leaves either the old file, the new file, or nothing, and never a
temporary file inside a DVC output.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path


class Folders:
    """Folders known to exist: a mkdir per small file is a measurable share of writing it."""

    def __init__(self) -> None:
        self._made: set[Path] = set()

    def make(self, *folders: Path) -> None:
        for folder in folders:
            if folder not in self._made:
                folder.mkdir(parents=True, exist_ok=True)
                self._made.add(folder)


def write_atomic(path: Path, data: bytes, scratch: Path | None = None, folders: Folders | None = None) -> None:
    """Write ``data`` to ``path`` via a temporary file in ``scratch`` (default: beside it)."""
    folder = scratch or path.parent
    (folders or Folders()).make(folder, path.parent)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        try:
            os.replace(tmp, path)
        except FileNotFoundError:  # the folder was removed under us: make it again
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
        except OSError as exc:
            if exc.errno != errno.EXDEV or scratch is None:
                raise
            os.unlink(tmp)  # scratch is on another file system: fall back to a temp file beside it
            write_atomic(path, data)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(scratch: Path, older_than: float = 3600.0) -> None:
    """Temporary files a killed run left behind (never in an output: only in ``scratch``)."""
    if not scratch.is_dir():
        return
    cutoff = time.time() - older_than  # spare those of a run that may still be going
    for leftover in scratch.glob(".tmp-*"):
        try:
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
        except FileNotFoundError:
            pass


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, text.encode("utf-8"))


def write_csv_atomic(path: Path, header: list[str], rows: Iterable[Iterable[object]]) -> None:
    """A CSV report (header, then rows as given; "\n" line ends on every platform), atomically.
    Rows are streamed to a temporary file beside ``path``, never held in memory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
        os.chmod(tmp, 0o644)  # mkstemp made it private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def replacing_folder(out: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out``; when the block ends without an error, the
    staging folder becomes ``out`` (the old one removed just before), else it is deleted. So
    ``out`` appears whole or not at all, and a killed run leaves only a hidden ``.NAME-*`` folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield staging
        for folder in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
            folder.chmod(0o755)  # mkdtemp made it private
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_folder_atomic(out: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (paths relative to ``out``) as the folder ``out``, which appears whole or not at all."""
    with replacing_folder(out) as staging:
        folders = Folders()
        for name, data in sorted(files.items()):
            target = staging / name
            write_atomic(target, data, folders=folders)
            target.chmod(0o644)  # mkstemp made it private


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
