"""Reader: turn CSV manifests and class folders into rows of (url, label, where to fetch it).

Nothing is fetched here. A row that can already be seen to be unusable (no url, a label that
is not a safe folder name, a scheme we do not fetch) carries its ``Drop`` and goes straight to
the report.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import unquote, urlsplit

from imgpipe.errors import StageError
from imgpipe.ingest.drops import Drop

REMOTE_SCHEMES = {"http", "https"}


@dataclass(frozen=True)
class Row:
    index: int  # position over all sources, in the order given: decides which duplicate is kept
    url: str  # as written in the manifest (or the file path for folder sources)
    label: str
    remote: str | None = None  # http(s) URL to fetch
    path: Path | None = None  # local file to read
    drop: Drop | None = None


def check_label(label: str) -> None:
    """Labels become folder names: refuse anything that could escape or hide in the output."""
    if label in {".", ".."} or label.startswith(".") or any(c in label for c in '/\\\0'):
        raise Drop("invalid_label", f"label {label!r} is not a valid folder name")
    if any(ord(c) < 32 for c in label) or label != label.strip():
        raise Drop("invalid_label", f"label {label!r} has control characters or surrounding spaces")


def locate(url: str, base: Path) -> tuple[str | None, Path | None]:
    """Return ``(remote_url, None)`` or ``(None, local_path)``; raise Drop for other schemes."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in REMOTE_SCHEMES:
        if not parts.hostname:
            raise Drop("unsupported_scheme", f"{scheme} URL without a host")
        return url, None
    if scheme == "file":
        if parts.netloc not in {"", "localhost"}:
            raise Drop("unsupported_scheme", f"file URL on another host ({parts.netloc})")
        return None, Path(unquote(parts.path))
    # A one-letter "scheme" is a Windows drive, anything else we do not fetch.
    if scheme and len(scheme) > 1:
        raise Drop("unsupported_scheme", f"scheme {scheme!r} is not http, https or file")
    path = Path(url)
    return None, path if path.is_absolute() else base / path


def _open_manifest(path: Path) -> TextIO:
    try:
        return path.open(newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise StageError(f"manifest {path} not found") from None
    except OSError as exc:
        raise StageError(f"manifest {path} cannot be read: {exc.strerror}") from None


def read_manifest(path: Path, start: int) -> Iterator[Row]:
    """The manifest's rows, one at a time (never the whole file in memory)."""
    with _open_manifest(path) as handle:
        try:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in ("url", "label") if c not in columns]
            if missing:
                found = ", ".join(columns) or "nothing"
                raise StageError(f"manifest {path}: header lacks {' and '.join(missing)} (found: {found})")
            reader.fieldnames = columns
            for offset, record in enumerate(reader):
                yield _manifest_row(record, path, start + offset, reader.line_num)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise StageError(f"manifest {path}: not a readable UTF-8 CSV ({exc})") from None


def _manifest_row(record: dict[str, str | None], manifest: Path, index: int, line: int) -> Row:
    url = (record.get("url") or "").strip()
    label = (record.get("label") or "").strip()
    try:
        if not url or not label:
            raise Drop("invalid_row", f"{manifest} line {line}: empty {'url' if not url else 'label'}")
        check_label(label)
        remote, local = locate(url, manifest.parent)
    except Drop as drop:
        return Row(index, url, label, drop=drop)
    return Row(index, url, label, remote=remote, path=local)


def _folder_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(label, file) for every file under ``root/<label>/`` (recursively), sorted; hidden ones skipped."""
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise StageError(f"folder source {root} has no class sub-folders (expected {root}/<label>/<image>)")
    for class_dir in classes:
        files = []  # one class's names at a time, sorted
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
        for path in sorted(files):
            yield class_dir.name, path


def read_folder(root: Path, start: int) -> Iterator[Row]:
    """Every file under ``root/<label>/`` as a row, label = first folder name, in sorted order."""
    for offset, (label, path) in enumerate(_folder_files(root)):
        try:
            check_label(label)
        except Drop as drop:
            yield Row(start + offset, path.as_posix(), label, drop=drop)
            continue
        yield Row(start + offset, path.as_posix(), label, path=path)


def read_sources(sources: list[Path]) -> Iterator[Row]:
    """All rows of all sources, in the order given, one at a time; a missing or malformed
    source stops the stage (``count_rows`` finds that before any work starts)."""
    start = 0
    for source in sources:
        rows = (read_folder if source.is_dir() else read_manifest)(source, start)
        for row in rows:
            start = row.index + 1
            yield row


def count_rows(sources: list[Path]) -> int:
    """How many rows the sources hold: one quick pass that also checks every source is readable,
    so a bad manifest stops the stage before anything is fetched, and the progress bar knows
    its total."""
    return sum(1 for _ in read_sources(sources))
