"""The served app, swappable while running: hot reload and graceful stop.

``Service`` is the ASGI app uvicorn runs. It passes each request to the current inner app (one
bundle, its batcher, its settings and keys) and counts the requests each inner app is answering.
A reload (SIGHUP or ``POST /admin/reload``) builds and starts a new inner app beside the old one,
switches to it once it is ready, and stops the old one only when its last request is answered;
a bundle that fails to load leaves the old app serving and the error is reported. On shutdown
(uvicorn's, after SIGTERM) ``draining`` turns ``/readyz`` 503 at once; uvicorn stops accepting
connections, waits for the requests already accepted (at most ``--drain-seconds``), then the
lifespan shutdown stops the batchers.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI

from serve.access_log import log_event


class InFlight:
    """Requests an inner app is answering; ``idle`` waits until there are none."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __enter__(self) -> None:
        self.count += 1
        self._idle.clear()

    def __exit__(self, *_: object) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


class ReloadError(Exception):
    """The new bundle did not load; the old one goes on serving."""


class Service:
    def __init__(self, first: FastAPI, rebuild: Callable[[], FastAPI], reload_on_sighup: bool = False) -> None:
        self.current, self.rebuild = first, rebuild
        self.reload_on_sighup = reload_on_sighup
        self.draining = False
        self.retiring: set[asyncio.Task] = set()
        self._lifespans: dict[int, AbstractAsyncContextManager] = {}
        self._reloading: asyncio.Lock | None = None
        self._adopt(first)

    @property
    def state(self):  # type: ignore[no-untyped-def]
        """The current inner app's state (its ``bundle``, ``settings``, ``metrics``)."""
        return self.current.state

    def _adopt(self, app: FastAPI) -> None:
        app.state.service, app.state.in_flight = self, InFlight()

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        app = self.current
        with app.state.in_flight:
            await app(scope, receive, send)

    async def _start(self, app: FastAPI) -> None:
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        self._lifespans[id(app)] = lifespan

    async def _stop(self, app: FastAPI) -> None:
        lifespan = self._lifespans.pop(id(app), None)
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)

    async def _lifespan(self, receive, send) -> None:  # type: ignore[no-untyped-def]
        await receive()  # lifespan.startup
        try:
            await self._start(self.current)
        except Exception as exc:  # noqa: BLE001 - reported to uvicorn, which exits with it
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        if self.reload_on_sighup and threading.current_thread() is threading.main_thread():
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload_reported("SIGHUP")))
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown: uvicorn has answered (or given up on) every request
        self.draining = True
        for task in list(self.retiring):  # uvicorn has waited for their requests already
            task.cancel()
        for lifespan in list(self._lifespans.values()):
            await lifespan.__aexit__(None, None, None)
        self._lifespans.clear()
        await send({"type": "lifespan.shutdown.complete"})

    def drain(self) -> None:
        """Called on SIGTERM, before uvicorn stops accepting: readiness fails from now on."""
        if not self.draining:
            self.draining = True
            log_event("draining", in_flight=self.current.state.in_flight.count)

    async def reload(self) -> FastAPI:
        """Load the bundle (and settings and keys) again beside the current app and switch to it."""
        self._reloading = self._reloading or asyncio.Lock()
        async with self._reloading:  # one reload at a time: the next one sees this one's result
            try:
                new = await asyncio.to_thread(self.rebuild)
                self._adopt(new)
                await self._start(new)
            except Exception as exc:  # noqa: BLE001 - any failure leaves the old app serving
                raise ReloadError(str(exc)) from None
            old, self.current = self.current, new
        task = asyncio.get_running_loop().create_task(self._retire(old))
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)
        return new

    async def _retire(self, old: FastAPI) -> None:
        await old.state.in_flight.idle()
        await self._stop(old)

    async def reload_reported(self, cause: str) -> None:
        """A reload whose outcome is logged (SIGHUP has nobody to answer)."""
        old = self.current.state.bundle
        try:
            new = (await self.reload()).state.bundle
        except ReloadError as exc:
            log_event("reload_failed", cause=cause, error=str(exc), model_version=old.version)
            return
        log_event("reloaded", cause=cause, model=new.name, model_version=new.version, previous_version=old.version)
