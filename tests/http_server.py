"""A real HTTP/1.1 server on 127.0.0.1 whose routes misbehave on purpose.

Each route is a function ``(handler, n)`` where ``n`` counts the requests made to that path so
far (1 for the first), so a route can fail once and then succeed.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Route = Callable[["Handler", int], None]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        n = self.server.record(self.path)
        route = self.server.routes.get(self.path)
        try:
            if route is None:
                send(self, 404, b"not found", "text/plain")
            else:
                route(self, n)
        finally:
            self.server.finished()

    def pause(self, seconds: float) -> bool:
        """Sleep unless the server is stopping; False once it is."""
        return not self.server.stopping.wait(seconds)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.times: dict[str, list[float]] = defaultdict(list)
        self.stopping = threading.Event()
        self.active = self.peak_active = 0  # requests being answered now, and the most at once
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def record(self, path: str) -> int:
        with self._lock:
            self.hits[path] += 1
            self.times[path].append(time.monotonic())
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)
            return self.hits[path]

    def finished(self) -> None:
        with self._lock:
            self.active -= 1

    def handle_error(self, request, client_address) -> None:  # resets and broken pipes are on purpose
        pass

    def __enter__(self) -> Server:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()


# --- route builders -------------------------------------------------------------------------


def send(handler: Handler, status: int, body: bytes = b"", content_type: str = "application/octet-stream",
         headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(body)


def head(handler: Handler, headers: dict[str, str]) -> None:
    """A 200 status line and headers, sent now; the route decides what body (if any) follows."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/jpeg")
    for key, value in headers.items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.flush()


def body(data: bytes, content_type: str = "image/jpeg") -> Route:
    return lambda h, n: send(h, 200, data, content_type)


def status(code: int) -> Route:
    return lambda h, n: send(h, code, b"error page", "text/html")


def fail_then(code: int, times: int, then: Route, headers: dict[str, str] | None = None) -> Route:
    def route(h: Handler, n: int) -> None:
        if n <= times:
            send(h, code, b"try later", "text/plain", headers)
        else:
            then(h, n)

    return route


def slow(data: bytes, seconds: float) -> Route:
    def route(h: Handler, n: int) -> None:
        h.pause(seconds)
        send(h, 200, data, "image/png")

    return route


def redirect(location: str) -> Route:
    return lambda h, n: send(h, 302, b"", "text/plain", {"Location": location})


def trickle(interval: float) -> Route:
    """Announce a large body and send one byte per ``interval``: never idle, never done."""

    def route(h: Handler, n: int) -> None:
        head(h, {"Content-Length": "100000"})
        while h.pause(interval):
            h.wfile.write(b"\xff")
            h.wfile.flush()

    return route


def stall(h: Handler, n: int) -> None:
    """Headers, then silence with the connection held open."""
    head(h, {"Content-Length": "5000"})
    h.pause(60)


def reset(h: Handler, n: int) -> None:
    """Close with a TCP RST instead of answering."""
    h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    h.connection.close()
    h.close_connection = True


def lying_length(data: bytes, announced: int) -> Route:
    def route(h: Handler, n: int) -> None:
        head(h, {"Content-Length": str(announced)})
        h.wfile.write(data)
        h.wfile.flush()
        h.close_connection = True

    return route


def declared_huge(h: Handler, n: int) -> None:
    head(h, {"Content-Length": str(10**12)})
    h.wfile.write(b"\xff\xd8")
    h.close_connection = True


def unannounced(size: int) -> Route:
    """A body with no Content-Length (ends when the connection closes)."""

    def route(h: Handler, n: int) -> None:
        head(h, {"Connection": "close"})
        block = b"\0" * 65536
        for _ in range(size // len(block)):
            try:
                h.wfile.write(block)
            except OSError:
                break
        h.close_connection = True

    return route
