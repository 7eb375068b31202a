"""Threads and worker processes: every item processed once, failures surface in the parent."""

from __future__ import annotations

import os
import threading
import time

import pytest

from imgpipe.ingest.pool import WorkerProcessError, run_sharded, run_threads


class Square:
    """A picklable worker recording which process and thread handled each item."""

    def __init__(self, share: int = 1) -> None:
        self.threads = share

    def __call__(self, item: int) -> tuple[int, int, int]:
        time.sleep(0.001)
        return item, item * item, os.getpid()

    def close(self) -> None:
        pass


class FailOn(Square):
    def __init__(self, bad: int, hard: bool) -> None:
        super().__init__(2)
        self.bad, self.hard = bad, hard

    def __call__(self, item: int) -> tuple[int, int, int]:
        if item == self.bad:
            if self.hard:
                os._exit(7)  # a crash that skips all cleanup
            raise ValueError(f"item {item} is bad")
        return super().__call__(item)


def test_run_threads_processes_each_item_once_with_bounded_concurrency():
    active, peak, lock = 0, 0, threading.Lock()

    def work(item: int) -> int:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.002)
        with lock:
            active -= 1
        return item * 2

    results = list(run_threads(work, range(200), threads=4))
    assert sorted(results) == [i * 2 for i in range(200)]
    assert 1 < peak <= 4


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_run_sharded_covers_every_item_across_processes(processes):
    results = list(run_sharded(Square, list(range(300)), concurrency=6, processes=processes,
                               preload=("tests.test_pool",)))
    assert sorted((item, square) for item, square, _ in results) == [(i, i * i) for i in range(300)]
    pids = {pid for _, _, pid in results}
    assert len(pids) == processes
    assert (os.getpid() in pids) == (processes == 1)


@pytest.mark.parametrize("hard", [False, True], ids=["raises", "dies"])
def test_a_failing_worker_process_stops_the_run(hard):
    with pytest.raises(WorkerProcessError, match="exit code 7" if hard else "ValueError: item 13 is bad") as caught:
        list(run_sharded(_fail_on_13_hard if hard else _fail_on_13, list(range(100)), concurrency=4, processes=2,
                         preload=("tests.test_pool",)))
    assert "\n" not in str(caught.value)
    assert ("Traceback" in caught.value.traceback_text) == (not hard)


def _fail_on_13(share: int) -> FailOn:
    return FailOn(13, hard=False)


def _fail_on_13_hard(share: int) -> FailOn:
    return FailOn(13, hard=True)
