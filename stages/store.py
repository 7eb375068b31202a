"""Writing files so that a crash never leaves a partial one, and the download cache.

Temporary files live in a scratch folder outside the outputs and are renamed into place, so
a SIGKILL at any moment leaves either the old file, the new file, or nothing, and never a
temporary file inside a DVC output.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
import tempfile
import time
from collections.abc import Iterable
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
    """A CSV report (header, then rows as given; "\n" line ends on every platform), atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def write_folder_atomic(out: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (paths relative to ``out``) as the folder ``out``, which appears whole or
    not at all: built beside it, then renamed into place (the old one removed just before)."""
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        folders = Folders()
        for name, data in sorted(files.items()):
            target = staging / name
            write_atomic(target, data, folders=folders)
            target.chmod(0o644)  # mkstemp made it private
        for folder in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
            folder.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class UrlCache:
    """Validated bytes of remote URLs, so an interrupted run does not fetch them again.

    ``objects/<sha256>`` holds content (a hard link to the output file where possible, so the
    cache costs no extra space), ``urls/<sha256 of URL>`` the content hash the URL gave.
    Content is checked against its hash on every read, so a damaged entry is refetched.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.scratch = root / "tmp"
        self.folders = Folders()

    def _url_entry(self, url: str) -> Path:
        key = sha256(url.encode("utf-8"))
        return self.root / "urls" / key[:2] / key

    def _object(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / digest

    def get(self, url: str) -> bytes | None:
        try:
            digest = self._url_entry(url).read_text(encoding="ascii").strip()
            data = self._object(digest).read_bytes()
        except (OSError, UnicodeDecodeError):
            return None
        return data if sha256(data) == digest else None

    def put(self, url: str, written: Path, digest: str) -> None:
        """Remember that ``url`` gave the content of ``written`` (hard-linked, not copied)."""
        obj = self._object(digest)
        if not obj.exists():
            self.folders.make(obj.parent)
            try:
                os.link(written, obj)
            except FileExistsError:
                pass
            except OSError:  # another file system, or no hard links there
                write_atomic(obj, written.read_bytes(), self.scratch, self.folders)
        write_atomic(self._url_entry(url), digest.encode("ascii"), self.scratch, self.folders)
