"""One download task: a chunk of rows in, what each row gave out. Runs on any worker of any node.

A task fetches the rows whose bytes it was not given (the coordinator gives it local files and
cached URLs, since a worker on another machine has neither), validates everything by decoding
it and hashes what it keeps. It writes nothing: the fetched bytes it keeps go back in its result,
and the coordinator caches them and places them in shards. So a task can be retried anywhere,
and the output never depends on which worker ran it.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

from imgpipe.distribute import run_threads
from imgpipe.files import sha256
from imgpipe.ingest.drops import Drop
from imgpipe.ingest.fetch import Fetcher, FetchLimits
from imgpipe.ingest.validate import inspect
from imgpipe.params import DownloadParams


@dataclass(frozen=True)
class Settings:
    """What a task needs of ``download:``, picklable and hashable (one fetcher per process and settings)."""

    limits: FetchLimits
    fetches: int  # concurrent downloads per task
    user_agent: str
    formats: tuple[str, ...]
    max_pixels: int
    min_side: int

    @classmethod
    def of(cls, p: DownloadParams) -> Settings:
        limits = FetchLimits(p.connect_timeout, p.read_timeout, p.deadline, p.retries, p.backoff,
                             p.retry_after_cap, p.max_redirects, p.max_bytes)
        return cls(limits, p.fetches_per_core, p.user_agent, tuple(p.formats), p.max_pixels, p.min_side)


@dataclass(frozen=True)
class Item:
    index: int
    url: str  # what to fetch when ``data`` is None
    data: bytes | None = None  # already read by the coordinator (a local file, a cached URL)


@dataclass(frozen=True)
class Checked:
    """What one row gave: a kept image (digest set) or a drop."""

    index: int
    digest: str | None = None
    extension: str = ""
    format: str = ""
    width: int = 0
    height: int = 0
    size: int = 0
    drop: Drop | None = None
    fetched: bool = False  # came over the network in this task (not from the cache)
    data: bytes | None = None  # the fetched bytes, for the coordinator to cache (None once it has)
    url: str = ""  # the URL fetched


@dataclass(frozen=True)
class Downloader:
    fetcher: Fetcher
    slots: threading.BoundedSemaphore  # at most ``Settings.fetches`` downloads at once


@functools.lru_cache(maxsize=1)
def downloader(settings: Settings) -> Downloader:
    """One pooled HTTP session per worker process, kept for its next task (connections reused).
    Called once per task, before its threads start, so they all share one."""
    return Downloader(Fetcher(settings.limits, settings.fetches, settings.user_agent),
                      threading.BoundedSemaphore(settings.fetches))


def check(settings: Settings, downloads: Downloader, item: Item) -> Checked:
    data, fetched = item.data, False
    try:
        if data is None:
            with downloads.slots:
                data, fetched = downloads.fetcher.fetch(item.url), True
        info = inspect(data, list(settings.formats), settings.max_pixels, settings.min_side)
    except Drop as drop:
        return Checked(item.index, drop=drop, fetched=fetched)
    if not fetched:
        return Checked(item.index, sha256(data), info.extension, info.format, info.width, info.height, len(data))
    return Checked(item.index, sha256(data), info.extension, info.format, info.width, info.height, len(data),
                   fetched=True, data=data, url=item.url)


def check_chunk(settings: Settings, items: list[Item]) -> list[Checked]:
    """Every item of a chunk, in index order. Twice as many threads as concurrent downloads, so
    that decoding one image never holds up the next download."""
    one = functools.partial(check, settings, downloader(settings))
    results = list(run_threads(one, items, 2 * settings.fetches, name="fetch"))
    return sorted(results, key=lambda c: c.index)
