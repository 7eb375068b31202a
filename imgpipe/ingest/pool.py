"""Run a function over many items with threads, optionally in several processes.

Downloading is mostly waiting, so threads suffice for concurrency; but parsing HTTP responses and
decoding images hold Python's GIL for milliseconds per item, so one process tops out at about
one core. ``run_sharded`` splits the items over processes, each with its own thread pool, and
streams results back in completion order. Results must be picklable; work items' heavy payloads
(image bytes) never cross process boundaries.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Worker(Protocol):
    """Built by ``factory(share)`` in each process, ``share`` being its part of the concurrency.

    ``threads`` is how many threads should call it: more than ``share`` lets a worker keep
    ``share`` slow operations (downloads) going while other threads do the quick ones.
    """

    threads: int

    def __call__(self, item: Any) -> Any: ...
    def close(self) -> None: ...


def run_threads(fn: Callable[[Item], Result], items: Iterable[Item], threads: int,
                name: str = "worker") -> Iterator[Result]:
    """Like ``pool.map`` with at most ``2 * threads`` items in flight, yielding as they finish.

    Finished futures arrive through a queue rather than ``concurrent.futures.wait``, whose cost
    grows with the number of pending futures.
    """
    finished: queue.SimpleQueue[Future[Result]] = queue.SimpleQueue()
    slots = threading.Semaphore(2 * threads)

    def on_done(future: Future[Result]) -> None:
        slots.release()
        finished.put(future)

    in_flight = 0
    with ThreadPoolExecutor(threads, thread_name_prefix=name) as pool:
        try:
            for item in items:
                while not slots.acquire(blocking=False):
                    in_flight -= 1
                    yield finished.get().result()
                in_flight += 1
                pool.submit(fn, item).add_done_callback(on_done)
            for _ in range(in_flight):
                yield finished.get().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class WorkerProcessError(RuntimeError):
    """A worker process raised or died: a one-line message, and the traceback when there is one."""

    def __init__(self, message: str, traceback_text: str = "") -> None:
        super().__init__(message)
        self.traceback_text = traceback_text


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _die_with_parent(parent_pid: int | None) -> None:
    """A worker must not outlive a killed parent (it would go on writing into the output).

    ``parent_pid`` is None under a fork server, the workers' actual parent, which itself exits
    when the main process goes away.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if parent_pid is not None and os.getppid() != parent_pid:  # died before prctl took effect
        os._exit(1)


def _child(factory: Callable[[int], Worker], shard: list, share: int, results: Any, parent_pid: int | None) -> None:
    _die_with_parent(parent_pid)
    try:
        worker = factory(share)
        try:
            batch: list = []
            flushed = time.monotonic()
            for result in run_threads(worker, shard, worker.threads):
                batch.append(result)
                if len(batch) >= 64 or time.monotonic() - flushed > 0.2:
                    results.put(("results", batch))
                    batch, flushed = [], time.monotonic()
            results.put(("results", batch))
        finally:
            worker.close()
        results.put(("done", None))
    except BaseException as exc:  # reported to the parent, which stops the run
        results.put(("error", (_one_line(exc), "".join(traceback.format_exception(exc)))))


def _start_method() -> str:
    # fork is fastest but unsafe once the parent runs other threads (a test's HTTP server,
    # say): then a clean fork server is used instead.
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def run_sharded(factory: Callable[[int], Worker], items: list, concurrency: int, processes: int,
                preload: tuple[str, ...] = ()) -> Iterator:
    """Share ``concurrency`` out over ``processes`` (round-robin shards); results in completion order.

    ``factory`` builds the worker inside each process (it must be picklable unless forking);
    ``preload`` names modules a fork server imports once, before forking the workers.
    The processes are started before this returns, so the caller may start threads afterwards.
    """
    processes = max(1, min(processes, concurrency, len(items)))
    if processes == 1:
        worker = factory(concurrency)

        def in_process() -> Iterator:
            try:
                yield from run_threads(worker, items, worker.threads)
            finally:
                worker.close()

        return in_process()

    context = multiprocessing.get_context(_start_method())
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(list(preload))
    results = context.Queue()
    shares = [concurrency // processes + (k < concurrency % processes) for k in range(processes)]
    parent_pid = os.getpid() if context.get_start_method() == "fork" else None
    sys.stdout.flush()
    sys.stderr.flush()
    children = [
        context.Process(target=_child, args=(factory, items[k::processes], shares[k], results, parent_pid),
                        name=f"worker-{k}", daemon=True)
        for k in range(processes)
    ]
    for child in children:
        child.start()
    return _collect(children, results)


def _collect(children: list, results: Any) -> Iterator:
    remaining = len(children)
    try:
        while remaining:
            try:
                kind, payload = results.get(timeout=0.5)
            except queue.Empty:
                dead = [c for c in children if c.exitcode not in (None, 0)]
                if dead:
                    raise WorkerProcessError(f"{dead[0].name} died with exit code {dead[0].exitcode}") from None
                continue
            if kind == "results":
                yield from payload
            elif kind == "done":
                remaining -= 1
            else:
                message, details = payload
                raise WorkerProcessError(f"a worker process failed: {message}", details)
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
            child.join()
        results.close()
