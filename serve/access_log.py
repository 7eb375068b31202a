"""One JSON line per request for operators, and the request id that ties it to the client.

The id is the client's ``X-Request-ID`` when it is well-formed (a proxy's or a caller's own
tracing id), else a new random one; it is echoed in the response either way. The line holds what
an operator needs and nothing a client sent as content: no image bytes, no URL bodies, no keys,
no query strings.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime

LOGGER = logging.getLogger("serve.access")
HEADER = "X-Request-ID"
WELL_FORMED = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # printable, no spaces or quotes: safe in a log line

# The running request's log fields, for the handlers to add to (the ONNX batch sizes its images ran in).
CURRENT: ContextVar[dict | None] = ContextVar("serve_request", default=None)


def note_batch(size: int) -> None:
    """Record that one of this request's images ran in an ONNX Runtime batch of ``size``."""
    fields = CURRENT.get()
    if fields is not None:
        fields["batch_sizes"].append(size)


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    given = dict(headers).get(HEADER.lower().encode(), b"").decode("latin-1")
    return given if WELL_FORMED.fullmatch(given) else uuid.uuid4().hex


def configure(level: str = "info") -> None:
    """Access lines go to stderr as they are (they are JSON already)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level.upper())
    LOGGER.propagate = False


def log_event(event: str, **fields: object) -> None:
    """A service event (a reload, a drain) as a JSON line beside the requests'."""
    LOGGER.info(json.dumps({"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event,
                            **fields}))


class AccessLog:
    """ASGI middleware: the request id header, and the JSON line once the response is sent."""

    def __init__(self, app, routes: set[str], model_version: str) -> None:  # type: ignore[no-untyped-def]
        self.app, self.routes, self.model_version = app, routes, model_version

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id(scope["headers"])
        fields: dict = {"batch_sizes": []}
        token = CURRENT.set(fields)
        status, started = 500, time.perf_counter()

        async def send_with_id(message):  # type: ignore[no-untyped-def]
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (HEADER.lower().encode(), rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            CURRENT.reset(token)
            route = scope["path"] if scope["path"] in self.routes else "other"
            LOGGER.info(json.dumps({
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"), "request_id": rid,
                "method": scope["method"], "route": route, "status": status,
                "latency_ms": round((time.perf_counter() - started) * 1000, 2),
                "batch_sizes": fields["batch_sizes"], "model_version": self.model_version}))
