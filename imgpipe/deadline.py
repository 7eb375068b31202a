"""Deadlines that hold against a peer that trickles: a total time limit for blocking socket I/O.

A socket timeout bounds each read, not a whole exchange: a server (or client) that sends one
byte every few seconds, or trickles its headers, resets it forever. So the sockets of one
exchange are attached to a ``Deadline``; one watchdog thread per process shuts down the sockets
of any deadline still running when its time is up, and the blocked read returns at once (EOF
or an error). The caller then sees ``guard.expired`` and reports a timeout::

    with deadline(10.0) as guard:
        sock = socket.create_connection(address, timeout=guard.remaining())
        guard.attach(sock)
        ...  # reads that end at the deadline, however the peer trickles
    if guard.expired: ...

Standard library only: the prediction service and the download stage share it.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Closable(Protocol):
    """A socket, or a TLS layer over one (``shutdown`` ends a blocked read in another thread)."""

    def shutdown(self, how: int, /) -> None: ...


class Deadline:
    """A monotonic time by which one exchange must be done, and the sockets it uses."""

    def __init__(self, at: float, seconds: float) -> None:
        self.at = at  # time.monotonic() value
        self.seconds = seconds  # the limit as configured, for messages
        self.expired = False
        self.finished = False
        self._sockets: list[Closable] = []
        self._lock = threading.Lock()

    def remaining(self) -> float:
        """Seconds left (0 once the deadline has passed)."""
        return max(0.0, self.at - time.monotonic())

    def attach(self, sock: Closable) -> None:
        """Watch ``sock``: it is shut down at the deadline (at once when that has passed)."""
        with self._lock:
            if self.finished:
                return
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)
        if not self.expired and self.remaining() == 0:
            self.expire()  # the watchdog may not have come round yet

    def expire(self) -> None:
        """Cut every attached socket, unless the exchange already finished."""
        with self._lock:
            if self.finished:
                return
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def finish(self) -> None:
        """The exchange is over: the watchdog leaves its sockets alone (they may be pooled)."""
        with self._lock:
            self.finished = True
            self._sockets.clear()


def _shutdown(sock: Closable) -> None:
    try:
        if isinstance(sock, socket.socket):
            # The plain socket's shutdown even for an ssl.SSLSocket: its own override also drops
            # the TLS state, which the thread blocked in a read is still using.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        else:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class _Watchdog:
    """One thread, one heap of deadlines: expires those whose exchange is still running."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="deadline-watchdog", daemon=True)
        self._thread.start()

    def watch(self, guard: Deadline) -> None:
        with self._cond:
            # Deadlines mostly arrive in increasing order: wake the thread only for a new earliest one.
            earliest = not self._heap or guard.at < self._heap[0][0]
            heapq.heappush(self._heap, (guard.at, next(self._order), guard))
            if earliest:
                self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                if not self._heap:
                    self._cond.wait()
                    continue
                at, _, guard = self._heap[0]
                wait = at - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                guard.expire()  # no-op when the exchange already finished


_watchdog: _Watchdog | None = None
_watchdog_lock = threading.Lock()
_current = threading.local()


def _forget_watchdog() -> None:
    # A forked child has the parent's watchdog object but not its thread (nor maybe a free lock).
    global _watchdog, _watchdog_lock
    _watchdog, _watchdog_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_watchdog)


def _the_watchdog() -> _Watchdog:
    global _watchdog
    with _watchdog_lock:
        if _watchdog is None:
            _watchdog = _Watchdog()
        return _watchdog


@contextmanager
def deadline(seconds: float, started: float | None = None) -> Iterator[Deadline]:
    """A deadline ``seconds`` after ``started`` (a ``time.monotonic()`` value; default now),
    watched while the block runs and the current one of this thread (see ``current``)."""
    guard = Deadline((time.monotonic() if started is None else started) + seconds, seconds)
    _the_watchdog().watch(guard)
    outer = getattr(_current, "guard", None)
    _current.guard = guard
    try:
        yield guard
    finally:
        guard.finish()
        _current.guard = outer


def current() -> Deadline | None:
    """The innermost deadline running in this thread, for code that opens sockets deep inside a
    library (e.g. urllib3's connections) and cannot be handed the guard."""
    return getattr(_current, "guard", None)
