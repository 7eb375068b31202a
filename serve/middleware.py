"""ASGI middleware of the service: the request body's limits, and per-request metrics."""

from __future__ import annotations

import asyncio
import time

from fastapi.responses import JSONResponse

from imgpipe.bundle import SERVING
from serve.errors import ApiError
from serve.metrics import Metrics


class UploadTimeout(Exception):
    """The request body did not arrive in time (raised from ``receive``; BodyLimit answers 408)."""


class BodyLimit:
    """ASGI middleware, the request body's limits.

    Size: a body over ``limit`` bytes is answered 413 (by Content-Length at once, else when the
    streamed bytes pass the limit), before anything reads it all into memory.

    Time: the whole body must have arrived ``upload_timeout`` seconds after the request's headers
    (one deadline, not a timeout per read: a client that trickles a byte a second never lets a
    per-read timeout fire). A late body is answered 408 ``upload_timeout`` with ``Connection:
    close``, so the server closes the connection instead of waiting for the rest.
    """

    def __init__(self, app, limit: int, upload_timeout: float = SERVING.upload_timeout) -> None:  # type: ignore[no-untyped-def]
        self.app, self.limit, self.upload_timeout = app, limit, upload_timeout

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await JSONResponse(_too_large(self.limit).body(), 413)(scope, receive, send)
        body = _Body(receive, send, self.limit, self.upload_timeout)
        try:
            await self.app(scope, body.receive, body.send)
        except Exception:  # however the app passed the timeout on (as is, in an exception group, ...)
            if not body.timed_out:
                raise
        if body.timed_out and not body.answered:
            late = ApiError(408, "upload_timeout", f"the request body did not arrive within the "
                                                   f"{self.upload_timeout:g} s upload timeout (--upload-timeout)")
            await JSONResponse(late.body(), 408, headers={"Connection": "close"})(scope, receive, send)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"request body is larger than {limit} bytes")


class _Body:
    """One request's ASGI ``receive`` and ``send`` as the app sees them: the body counted against
    the size limit and due by a deadline; the app's own answer dropped once that has passed."""

    def __init__(self, receive, send, limit: int, timeout: float) -> None:  # type: ignore[no-untyped-def]
        self._receive, self._send, self.limit = receive, send, limit
        self.arrive_by = asyncio.get_running_loop().time() + timeout  # the loop's clock is monotonic
        self.seen, self.complete, self.timed_out, self.answered = 0, False, False, False

    async def receive(self):  # type: ignore[no-untyped-def]
        if self.complete:  # later calls wait for the client to disconnect: no deadline on that
            return await self._receive()
        try:
            async with asyncio.timeout_at(self.arrive_by):
                message = await self._receive()
        except TimeoutError:
            self.timed_out = True
            raise UploadTimeout from None
        self.complete = message["type"] != "http.request" or not message.get("more_body", False)
        self.seen += len(message.get("body", b""))
        if self.seen > self.limit:
            raise _too_large(self.limit)
        return message

    async def send(self, message) -> None:  # type: ignore[no-untyped-def]
        if self.timed_out and not self.answered:
            return  # whatever the app made of the timeout, BodyLimit's 408 is the answer
        self.answered = self.answered or message["type"] == "http.response.start"
        await self._send(message)


class Timing:
    """ASGI middleware: request count by status and latency, labelled by route template."""

    def __init__(self, app, metrics: Metrics, routes: set[str]) -> None:  # type: ignore[no-untyped-def]
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"
        status, started = 500, time.perf_counter()

        async def recorded(message):  # type: ignore[no-untyped-def]
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recorded)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
