"""Download and validate: manifests and class folders -> image shards and a report.

Reader (``imgpipe.ingest.sources``) -> tasks on a distributor (``imgpipe.ingest.task``: fetch,
validate, hash; ``imgpipe.distribute``) -> this coordinator, which writes. Nothing here grows with
the number of rows:

1. **Map.** Rows stream from the manifests in chunks; each chunk is a task, and results come
   back with a bounded number in flight. Fetched bytes enter the URL cache as soon as their
   chunk is back, so a killed run never fetches them again. Then, in chunk order, each kept
   image is appended to one of 256 spill files chosen by its sha256's first byte (a line of
   metadata: its bytes lie in the URL cache or the local file), each dropped row to a drops file.
2. **Reduce.** Equal bytes always meet in the same spill file, so duplicates and label conflicts
   are resolved there, one file at a time, in row order.
3. **Write.** The kept images go, in sha256 order, into tar shards placed by content hash
   (``imgpipe.shards``), written in a staging folder that replaces ``out`` whole. The report and
   ``rejected.csv`` (in row order) follow from the same passes.

The output and the report depend only on the sources and the bytes fetched, never on timing,
completion order or the number of machines, so DVC's hash of them is stable.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import resource
import shutil
import tempfile
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from imgpipe.distribute import TaskFailed, describe, distributor
from imgpipe.errors import StageError
from imgpipe.files import remove_stale_temporaries, replacing_folder, sha256, write_csv_atomic, write_text_atomic
from imgpipe.ingest.cache import UrlCache
from imgpipe.ingest.drops import REASONS, Drop
from imgpipe.ingest.fetch import read_local
from imgpipe.ingest.sources import Row, count_rows, read_sources
from imgpipe.ingest.task import Checked, Item, Settings, check_chunk
from imgpipe.params import DownloadParams
from imgpipe.shards import SHARD_NAME, ImageMeta, ShardWriter, shard_count, shard_name, shard_of

NAME = "download"  # in progress bars and summary lines
BUCKETS = 256  # spill files, by the first byte of the sha256: one holds about 1/256 of the rows
RUN_PREFIX = "run-"  # a run's spill folder inside the cache folder


@dataclass
class Tally:
    """The report's numbers, counted as rows stream by."""

    total: int = 0
    kept: int = 0
    bytes: int = 0
    fetched: int = 0
    labels: set[str] = field(default_factory=set)  # of rows that were not dropped on reading
    per_class: Counter = field(default_factory=Counter)
    by_reason: Counter = field(default_factory=Counter)

    def report(self) -> dict:
        per_class = {label: self.per_class[label] for label in sorted(self.labels | set(self.per_class))}
        return {
            "total": self.total,
            "kept": self.kept,
            "dropped": sum(self.by_reason.values()),
            "bytes": self.bytes,
            "classes": len(per_class),
            "kept_per_class": per_class,  # a class whose every row was dropped shows up with 0
            "dropped_by_reason": {reason: self.by_reason[reason] for reason in sorted(REASONS)},
        }


@dataclass(frozen=True)
class Candidate:
    """A validated image before duplicates are resolved: one line of a spill file."""

    index: int
    url: str
    label: str
    digest: str
    extension: str
    format: str
    width: int
    height: int
    size: int
    path: str | None  # a local file; None: the bytes are in the URL cache

    def line(self) -> str:
        return json.dumps(list(self.__dict__.values()), ensure_ascii=False) + "\n"

    @classmethod
    def parse(cls, line: str) -> Candidate:
        return cls(*json.loads(line))


Rejected = tuple[int, str, str, str, str]  # (row index, url, label, reason, detail)


class Spill:
    """A run's scratch files on the coordinator's disk: candidates by bucket, drops in row order."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._buckets: dict[int, TextIO] = {}  # at most BUCKETS open files
        self._duplicates: list[str] = []  # files of the buckets that had some
        self._drops = self._open("drops.jsonl")

    def _open(self, name: str) -> TextIO:
        return (self.folder / name).open("w", encoding="utf-8")

    def add(self, candidate: Candidate) -> None:
        bucket = int(candidate.digest[:2], 16)
        if bucket not in self._buckets:
            self._buckets[bucket] = self._open(f"bucket-{bucket:03d}.jsonl")
        self._buckets[bucket].write(candidate.line())

    def drop(self, rejected: Rejected) -> None:
        self._drops.write(json.dumps(rejected, ensure_ascii=False) + "\n")

    def close(self) -> None:
        for handle in [self._drops, *self._buckets.values()]:
            handle.close()

    def candidates(self, bucket: int) -> list[Candidate]:
        """One bucket's candidates, in row order."""
        if bucket not in self._buckets:
            return []
        with (self.folder / f"bucket-{bucket:03d}.jsonl").open(encoding="utf-8") as handle:
            return [Candidate.parse(line) for line in handle]

    def write_duplicates(self, bucket: int, dropped: list[Rejected]) -> None:
        self._duplicates.append(f"duplicates-{bucket:03d}.jsonl")
        with self._open(self._duplicates[-1]) as handle:
            handle.writelines(json.dumps(rejected, ensure_ascii=False) + "\n" for rejected in dropped)

    def rejected(self) -> Iterator[Rejected]:
        """Every drop, in row order: the drops file and each bucket's duplicates are each in row
        order, so a merge of them is too (one line of each in memory)."""
        names = ["drops.jsonl", *self._duplicates]
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context((self.folder / name).open(encoding="utf-8")) for name in names]
            yield from heapq.merge(*(map(_parse_rejected, f) for f in files))


def _parse_rejected(line: str) -> Rejected:
    return tuple(json.loads(line))  # type: ignore[return-value]


def resolve(candidates: list[Candidate]) -> tuple[list[Candidate], list[Rejected]]:
    """Same bytes under several rows (one bucket's candidates, in row order): keep the first row,
    or drop all when the labels disagree. Returns the kept in sha256 order and the drops in row order."""
    by_digest: dict[str, list[Candidate]] = defaultdict(list)
    for c in candidates:
        by_digest[c.digest].append(c)
    kept, dropped = [], []
    for digest in sorted(by_digest):
        group = by_digest[digest]
        labels = sorted({c.label for c in group})
        if len(labels) > 1:
            for c in group:
                others = ", ".join(repr(label) for label in labels if label != c.label)
                dropped.append((c.index, c.url, c.label, "label_conflict", f"same bytes also labelled {others}"))
            continue
        first, *rest = group
        kept.append(first)
        dropped += [(c.index, c.url, c.label, "duplicate", f"same bytes as {first.url}") for c in rest]
    return kept, sorted(dropped)


def check_output_folder(out: Path) -> None:
    """Refuse to run over a folder holding anything this stage would not have written."""
    if not out.exists():
        return
    if not out.is_dir():
        raise StageError(f"--out {out} exists and is not a folder")
    for entry in sorted(out.iterdir()):
        if not (entry.is_file() and SHARD_NAME.match(entry.name)):
            raise StageError(f"--out {out} holds {entry.name}, which this stage did not write; "
                             "use an empty folder or one written by this stage")


def remove_stale_runs(cache_dir: Path, older_than: float = 3600.0) -> None:
    """Spill folders of killed runs (never of one that may still be going)."""
    cutoff = time.time() - older_than
    for leftover in cache_dir.glob(f"{RUN_PREFIX}*"):
        try:
            if leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:
            pass


class Coordinator:
    """Prepares the tasks, takes their results in order, and writes everything."""

    def __init__(self, p: DownloadParams, cache: UrlCache, refresh: bool, spill: Spill) -> None:
        self.p, self.cache, self.refresh, self.spill = p, cache, refresh, spill
        self.settings = Settings.of(p)
        self.tally = Tally()
        self.pending: deque[tuple[list[Row], dict[int, Drop]]] = deque()  # chunks in flight, oldest first

    def tasks(self, rows: Iterator[Row]) -> Iterator[tuple[Settings, list[Item]]]:
        """One task per chunk of rows. The coordinator reads what only it can (local files,
        the URL cache) and hands the bytes over; the task fetches the rest."""
        while chunk := list(itertools.islice(rows, self.p.rows_per_task)):
            items, drops = [], {}
            for row in chunk:
                if row.drop is not None:
                    continue
                try:
                    if row.remote:
                        data = None if self.refresh else self.cache.get(row.remote)
                        items.append(Item(row.index, row.remote, data))
                    else:
                        assert row.path is not None
                        items.append(Item(row.index, row.url, read_local(row.path, self.p.max_bytes)))
                except Drop as drop:
                    drops[row.index] = drop
            self.pending.append((chunk, drops))
            yield self.settings, items

    def cache_fetched(self, results: list[Checked]) -> list[Checked]:
        """As soon as a chunk is back: its fetched bytes into the URL cache, so that a killed run
        never fetches them again. What is kept for ``take`` holds no image bytes."""
        for c in results:
            if c.data is not None and c.digest is not None:
                self.cache.put(c.url, c.data, c.digest)
        return [replace(c, data=None) if c.data is not None else c for c in results]

    def take(self, results: list[Checked]) -> None:
        """A chunk's results, in chunk order: spill the kept, log the dropped (in row order)."""
        chunk, drops = self.pending.popleft()
        checked = {c.index: c for c in results}
        for row in chunk:
            self.tally.total += 1
            if row.drop is None:
                self.tally.labels.add(row.label)
            result = checked.get(row.index)
            self.tally.fetched += bool(result and result.fetched)
            drop = row.drop or drops.get(row.index) or (result.drop if result else None)
            if drop is not None:
                self.tally.by_reason[drop.reason] += 1
                self.spill.drop((row.index, row.url, row.label, drop.reason, drop.detail))
                continue
            assert result is not None and result.digest is not None, f"row {row.index} has no result"
            self.spill.add(Candidate(row.index, row.url, row.label, result.digest, result.extension,
                                        result.format, result.width, result.height, result.size,
                                     None if row.remote else str(row.path)))

    def resolve_all(self) -> int:
        """Resolve duplicates bucket by bucket; returns how many images are kept."""
        for bucket in range(BUCKETS):
            kept, dropped = resolve(self.spill.candidates(bucket))
            for c in kept:
                self.tally.kept += 1
                self.tally.bytes += c.size
                self.tally.per_class[c.label] += 1
            for rejected in dropped:
                self.tally.by_reason[rejected[3]] += 1
            if dropped:
                self.spill.write_duplicates(bucket, dropped)
        return self.tally.kept

    def image_bytes(self, c: Candidate) -> bytes:
        """The kept bytes, from the local file or the URL cache, checked against the hash seen."""
        source = Path(c.path) if c.path else self.cache.object_path(c.digest)
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise StageError(f"{c.url}: {source} cannot be read any more ({exc.strerror})") from None
        if sha256(data) != c.digest:
            raise StageError(f"{c.url}: {source} changed while the stage ran; run it again")
        return data

    def write_shards(self, out: Path, kept: int) -> int:
        """Every kept image into its shard, in sha256 order; ``out`` appears whole or not at all.
        Shards that no image fell in are written empty, so the set is always complete."""
        count = shard_count(kept, self.p.shard_size)
        with replacing_folder(out) as staging, tqdm(total=kept, desc=f"{NAME}: shards", unit="img",
                                                    mininterval=0.5, disable=None) as bar:
            current, writer = 0, ShardWriter(staging / shard_name(0, count))
            for bucket in range(BUCKETS):
                for c in resolve(self.spill.candidates(bucket))[0]:
                    while current < shard_of(c.digest, count):
                        writer.close()
                        current += 1
                        writer = ShardWriter(staging / shard_name(current, count))
                    writer.add(c.digest, c.extension, self.image_bytes(c),
                               ImageMeta(c.label, c.url, c.format, c.width, c.height))
                    bar.update()
            writer.close()
            for index in range(current + 1, count):
                ShardWriter(staging / shard_name(index, count)).close()
        return count

    def rejected(self) -> Iterator[tuple[str, str, str, str]]:
        """Every dropped row, in row order, as rejected.csv's columns."""
        for _, url, label, reason, detail in self.spill.rejected():
            yield url, label, reason, detail


def summary_line(report: dict, shards: int, seconds: float, fetched: int, engine: str) -> str:
    reasons = ", ".join(f"{r} {n}" for r, n in report["dropped_by_reason"].items() if n)
    rate = report["total"] / seconds if seconds > 0 else 0.0
    return (f"{NAME}: {report['total']} rows -> {report['kept']} images in {report['classes']} classes "
            f"({shards} shard{'s' * (shards != 1)}), {report['dropped']} dropped ({reasons or 'none'}); "
            f"{fetched} fetched over the network; {engine}, {seconds:.1f} s, {rate:.0f} rows/s")


def log_line(log: Path, record: dict) -> None:
    """Append to the untracked log: where timings and tracebacks go, never into DVC outputs."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}) + "\n")


@dataclass(frozen=True)
class Result:
    report: dict  # what reports/download/metrics.json holds
    rejected_csv: Path
    shards: int
    seconds: float
    fetched: int  # URLs that came over the network in this run
    engine: str


def download(sources: list[Path], out: Path, p: DownloadParams, report_path: Path, cache_dir: Path,
             refresh: bool, log: Path, engine: str | None = None, address: str | None = None) -> Result:
    """Fetch or read every row, keep the images in shards under ``out``, write the report
    (``report_path``) and ``rejected.csv`` beside it, and a line of timings to the untracked
    ``log``. Raises StageError when nothing usable is left."""
    started = time.monotonic()
    total = count_rows(sources)
    if not total:
        raise StageError(f"no rows in {' '.join(map(str, sources))}")
    check_output_folder(out)
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(cache_dir / "tmp")
    remove_stale_runs(cache_dir)

    with tempfile.TemporaryDirectory(prefix=RUN_PREFIX, dir=cache_dir) as scratch:
        spill = Spill(Path(scratch))
        coordinator = Coordinator(p, UrlCache(cache_dir), refresh, spill)
        try:
            with distributor(engine, address, p.processes, preload=("imgpipe.ingest.task",)) as engine_used, \
                    tqdm(total=total, desc=NAME, unit="url", mininterval=0.5, disable=None) as bar:
                used = describe(engine_used)
                tasks = coordinator.tasks(read_sources(sources))
                for results in engine_used.map(check_chunk, tasks, on_result=coordinator.cache_fetched):
                    done = coordinator.tally.total
                    coordinator.take(results)
                    bar.update(coordinator.tally.total - done)
        except TaskFailed as exc:
            if exc.traceback_text:
                log_line(log, {"error": str(exc), "traceback": exc.traceback_text})
            raise StageError(f"{exc} (details in {log})" if exc.traceback_text else str(exc)) from None
        finally:
            spill.close()

        kept = coordinator.resolve_all()
        shards = coordinator.write_shards(out, kept)
        report = coordinator.tally.report()
        rejected_csv = report_path.with_name("rejected.csv")
        write_text_atomic(report_path, json.dumps(report, indent=2) + "\n")
        write_csv_atomic(rejected_csv, ["url", "label", "reason", "detail"], coordinator.rejected())

    seconds = time.monotonic() - started
    fetched = coordinator.tally.fetched
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process, not its workers
    log_line(log, {"rows": total, "kept": kept, "shards": shards, "fetched": fetched, "engine": used,
                   "seconds": round(seconds, 3), "rows_per_s": round(total / seconds, 1) if seconds else None,
                   "coordinator_peak_rss_mb": round(peak_mb, 1)})
    return Result(report, rejected_csv, shards, seconds, fetched, used)


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
