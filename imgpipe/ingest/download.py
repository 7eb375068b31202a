"""Download and validate: manifests and class folders -> ``OUT/<label>/<sha256>.<ext>`` and a report.

Reader (``imgpipe.ingest.sources``) -> downloader (``imgpipe.ingest.fetch``) -> validator
(``imgpipe.ingest.validate``) -> writer (here), rows shared out over worker processes by
``imgpipe.ingest.pool``. The output and the report depend only on the sources and the bytes
fetched, never on timing or completion order, so DVC's hash of them is stable.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from imgpipe.errors import StageError
from imgpipe.files import (
    Folders,
    remove_stale_temporaries,
    sha256,
    write_atomic,
    write_csv_atomic,
    write_text_atomic,
)
from imgpipe.images import EXTENSIONS
from imgpipe.ingest.cache import UrlCache
from imgpipe.ingest.drops import REASONS, Drop
from imgpipe.ingest.fetch import Fetcher, FetchLimits, read_local
from imgpipe.ingest.pool import WorkerProcessError, run_sharded
from imgpipe.ingest.sources import Row, read_sources
from imgpipe.ingest.validate import inspect
from imgpipe.params import DownloadParams

NAME = "download"  # in progress bars and summary lines
OUTPUT_FILE = re.compile(rf"^[0-9a-f]{{64}}\.({'|'.join(sorted(set(EXTENSIONS.values())))})$")


@dataclass(frozen=True)
class Outcome:
    row: Row
    digest: str | None = None
    extension: str | None = None
    size: int = 0
    drop: Drop | None = None
    fetched: bool = False  # came over the network in this run (not from the cache)


class Writer:
    """Writes each (label, content) once per process, atomically, however many rows carry it."""

    def __init__(self, out: Path, scratch: Path) -> None:
        self.out, self.scratch = out, scratch
        self.folders = Folders()
        self._written: dict[Path, threading.Event] = {}
        self._lock = threading.Lock()

    def write(self, label: str, digest: str, extension: str, data: bytes) -> Path:
        """Return the path once the file is in place (written here or by another thread)."""
        path = self.out / label / f"{digest}.{extension}"
        with self._lock:
            done = self._written.get(path)
            mine = done is None
            if mine:
                done = self._written[path] = threading.Event()
        if mine:
            try:
                write_atomic(path, data, self.scratch, self.folders)
            finally:
                done.set()
        else:
            done.wait()
        return path


class Processor:
    """One row in, one Outcome out: fetch or read, validate, write. One per worker process.

    ``share`` downloads run at once; twice as many threads call it, so that validating and
    writing one image never holds up the next download.
    """

    def __init__(self, p: DownloadParams, out: Path, cache_dir: Path, refresh: bool, share: int) -> None:
        self.p, self.refresh = p, refresh
        self.threads = 2 * share
        self.downloads = threading.BoundedSemaphore(share)
        self.writer = Writer(out, cache_dir / "tmp")
        self.cache = UrlCache(cache_dir)
        limits = FetchLimits(
            p.connect_timeout, p.read_timeout, p.deadline, p.retries, p.backoff,
            p.retry_after_cap, p.max_redirects, p.max_bytes,
        )
        self.fetcher = Fetcher(limits, p.workers, p.user_agent)

    def close(self) -> None:
        self.fetcher.close()

    def __call__(self, row: Row) -> Outcome:
        fetched = False
        try:
            if row.remote:
                data = None if self.refresh else self.cache.get(row.remote)
                if data is None:
                    with self.downloads:
                        data, fetched = self.fetcher.fetch(row.remote), True
            else:
                assert row.path is not None
                data = read_local(row.path, self.p.max_bytes)
            info = inspect(data, list(self.p.formats), self.p.max_pixels, self.p.min_side)
        except Drop as drop:
            return Outcome(row, drop=drop, fetched=fetched)
        digest = sha256(data)
        written = self.writer.write(row.label, digest, info.extension, data)
        if fetched:
            self.cache.put(row.remote, written, digest)
        return Outcome(row, digest, info.extension, len(data), fetched=fetched)


def resolve_duplicates(outcomes: list[Outcome]) -> list[Outcome]:
    """Same bytes under several rows: keep the first row, or drop all when the labels disagree."""
    by_digest: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        if outcome.digest:
            by_digest[outcome.digest].append(outcome)
    resolved = [o for o in outcomes if not o.digest]
    for group in by_digest.values():
        group.sort(key=lambda o: o.row.index)
        labels = sorted({o.row.label for o in group})
        if len(labels) > 1:
            for o in group:
                others = ", ".join(repr(label) for label in labels if label != o.row.label)
                drop = Drop("label_conflict", f"same bytes also labelled {others}")
                resolved.append(Outcome(o.row, drop=drop, fetched=o.fetched))
            continue
        first, *rest = group
        resolved.append(first)
        for o in rest:
            resolved.append(Outcome(o.row, drop=Drop("duplicate", f"same bytes as {first.row.url}"), fetched=o.fetched))
    return sorted(resolved, key=lambda o: o.row.index)


def check_output_folder(out: Path) -> None:
    """Refuse to run over a folder holding anything this stage would not have written."""
    if not out.exists():
        return
    if not out.is_dir():
        raise StageError(f"--out {out} exists and is not a folder")
    for entry in out.rglob("*"):
        relative = entry.relative_to(out)
        ours = (
            (entry.is_dir() and len(relative.parts) == 1)
            or (entry.is_file() and len(relative.parts) == 2 and OUTPUT_FILE.match(entry.name))
            or entry.name.startswith(".tmp-")
        )
        if not ours:
            raise StageError(f"--out {out} holds {relative}, which this stage did not write; "
                             "use an empty folder or one written by this stage")


def prune_output_folder(out: Path, keep: set[Path]) -> None:
    """Remove what this run did not keep (label conflicts, stale files of earlier runs)."""
    if not out.exists():
        return
    for entry in sorted(out.rglob("*"), reverse=True):
        if entry.is_file() and entry not in keep:
            entry.unlink()
        elif entry.is_dir() and not any(entry.iterdir()):
            entry.rmdir()


def build_report(rows: list[Row], outcomes: list[Outcome]) -> tuple[dict, list[tuple[str, str, str, str]]]:
    kept = [o for o in outcomes if not o.drop]
    per_class = Counter(o.row.label for o in kept)
    for row in rows:  # a class whose every row was dropped still shows up, with 0
        if row.drop is None:
            per_class.setdefault(row.label, 0)
    by_reason = Counter(o.drop.reason for o in outcomes if o.drop)
    report = {
        "total": len(rows),
        "kept": len(kept),
        "dropped": len(outcomes) - len(kept),
        "bytes": sum(o.size for o in kept),
        "classes": len(per_class),
        "kept_per_class": dict(sorted(per_class.items())),
        "dropped_by_reason": {reason: by_reason[reason] for reason in sorted(REASONS)},
    }
    rejected = sorted((o.row.url, o.row.label, o.drop.reason, o.drop.detail) for o in outcomes if o.drop)
    return report, rejected


def summary_line(report: dict, seconds: float, fetched: int) -> str:
    reasons = ", ".join(f"{r} {n}" for r, n in report["dropped_by_reason"].items() if n)
    rate = report["total"] / seconds if seconds > 0 else 0.0
    return (f"{NAME}: {report['total']} rows -> {report['kept']} images in {report['classes']} classes, "
            f"{report['dropped']} dropped ({reasons or 'none'}); {fetched} fetched over the network; "
            f"{seconds:.1f} s, {rate:.0f} rows/s")


def log_line(log: Path, record: dict) -> None:
    """Append to the untracked log: where timings and tracebacks go, never into DVC outputs."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}) + "\n")


@dataclass(frozen=True)
class Result:
    report: dict  # what reports/download/metrics.json holds
    rejected_csv: Path
    seconds: float
    fetched: int  # URLs that came over the network in this run


def download(sources: list[Path], out: Path, p: DownloadParams, report_path: Path, cache_dir: Path,
             refresh: bool, log: Path) -> Result:
    """Fetch or read every row, keep the images, write the report (``report_path``) and
    ``rejected.csv`` beside it, and a line of timings to the untracked ``log``. Raises StageError
    when nothing usable is left."""
    started = time.monotonic()
    rows = read_sources(sources)
    if not rows:
        raise StageError(f"no rows in {' '.join(map(str, sources))}")
    check_output_folder(out)
    remove_stale_temporaries(cache_dir / "tmp")

    work = [row for row in rows if row.drop is None]
    outcomes = [Outcome(row, drop=row.drop) for row in rows if row.drop is not None]
    processes = p.processes or os.cpu_count() or 1
    factory = functools.partial(Processor, p, out, cache_dir, refresh)
    results = run_sharded(factory, work, p.workers, processes, preload=(__name__,))
    counts = Counter(kept=0, dropped=len(outcomes))  # "kept" before duplicates are resolved
    try:
        with tqdm(total=len(rows), initial=len(outcomes), desc=NAME, unit="url", mininterval=0.5,
                  disable=None) as bar:
            for outcome in results:
                outcomes.append(outcome)
                counts["dropped" if outcome.drop else "kept"] += 1
                bar.set_postfix(counts, refresh=False)
                bar.update()
    except WorkerProcessError as exc:
        if exc.traceback_text:
            log_line(log, {"error": str(exc), "traceback": exc.traceback_text})
        raise StageError(f"{exc} (details in {log})" if exc.traceback_text else str(exc)) from None

    outcomes = resolve_duplicates(outcomes)
    keep = {out / o.row.label / f"{o.digest}.{o.extension}" for o in outcomes if o.digest and not o.drop}
    prune_output_folder(out, keep)
    out.mkdir(parents=True, exist_ok=True)

    report, rejected = build_report(rows, outcomes)
    rejected_csv = report_path.with_name("rejected.csv")
    write_text_atomic(report_path, json.dumps(report, indent=2) + "\n")
    write_csv_atomic(rejected_csv, ["url", "label", "reason", "detail"], rejected)
    seconds = time.monotonic() - started
    fetched = sum(o.fetched for o in outcomes)
    log_line(log, {"rows": len(rows), "kept": report["kept"], "fetched": fetched, "seconds": round(seconds, 3),
                   "rows_per_s": round(len(rows) / seconds, 1) if seconds else None})
    return Result(report, rejected_csv, seconds, fetched)


def check_enough(result: Result, min_images_per_class: int) -> None:
    """Stop the pipeline when no image, or too few images of some class, survived."""
    report = result.report
    if not report["kept"]:
        raise StageError(f"no image kept out of {report['total']} rows; reasons in {result.rejected_csv}")
    small = {label: n for label, n in report["kept_per_class"].items() if n < min_images_per_class}
    if small:
        listed = ", ".join(f"{label!r} ({n})" for label, n in small.items())
        raise StageError(f"classes with fewer than download.min_images_per_class={min_images_per_class} "
                         f"images: {listed}; reasons in {result.rejected_csv}")
