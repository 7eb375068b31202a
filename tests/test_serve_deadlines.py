"""Deadlines that hold against peers that trickle: a remote image server that sends its headers or
its body a byte at a time (or never answers) is cut at the remote timeout, and a client that
trickles its upload gets 408 at the upload timeout. Real loopback servers and sockets; each would
go on for HOLD seconds, so a deadline that does not hold fails the test."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from imgpipe.deadline import current, deadline
from serve.app import Settings, create_app
from serve.remote import RemotePolicy
from serve.running import running
from tests import images

REMOTE_TIMEOUT = 1.5
UPLOAD_TIMEOUT = 1.0
HOLD = 30.0  # how long the misbehaving peers are willing to go on
DRIP = 0.25  # seconds between the bytes they trickle
# The trickling client's pace: not a divisor of UPLOAD_TIMEOUT, so that its next byte is not on the
# wire as the 408 goes out (a byte that reaches the closed socket makes the kernel reset the
# connection, and a reset throws away the client's unread answer).
UPLOAD_DRIP = 0.3


# --- a loopback image server that misbehaves slowly ------------------------------------------


def trickle_headers(conn: socket.socket, stopping: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Slow: ")
    while not stopping.wait(DRIP):
        conn.sendall(b"a")


def trickle_body(conn: socket.socket, stopping: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n\x89PNG")
    while not stopping.wait(DRIP):
        conn.sendall(b"\0")


def never_answer(conn: socket.socket, stopping: threading.Event) -> None:
    conn.recv(1)  # returns (b"") when the client closes, or times out after HOLD


MODES: dict[str, Callable[[socket.socket, threading.Event], None]] = {
    "/headers.png": trickle_headers, "/body.png": trickle_body, "/silent.png": never_answer,
}


class Trickler:
    """Answers each connection by the path asked for (any non-HTTP bytes, e.g. a TLS hello: never);
    ``ended`` is how long after it was accepted the client's end of the connection closed."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.ended: list[float] = []
        self._conns: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed: stopping
            self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        accepted = time.monotonic()
        conn.settimeout(HOLD)
        try:
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            line = request.split(b"\r\n", 1)[0].split()
            path = line[1].decode("latin-1") if len(line) == 3 else ""
            MODES.get(path, never_answer)(conn, self.stopping)
        except OSError:
            pass  # the client cut the connection: what the service should do
        finally:
            if not self.stopping.is_set():
                self.ended.append(time.monotonic() - accepted)
            conn.close()

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def wait_ended(self, within: float) -> float | None:
        stop = time.monotonic() + within
        while not self.ended and time.monotonic() < stop:
            time.sleep(0.05)
        return self.ended[0] if self.ended else None

    def close(self) -> None:
        self.stopping.set()
        for conn in [self.listener, *self._conns]:  # shutdown, unlike close, wakes a blocked accept or recv
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)
        self.listener.close()


@pytest.fixture
def trickler() -> Iterator[Trickler]:
    server = Trickler()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def service(bundles) -> Iterator[str]:
    policy = RemotePolicy.from_cidrs(True, ["127.0.0.1/32"], timeout=REMOTE_TIMEOUT)
    settings = Settings(bundle=bundles["cam"], remote=policy, upload_timeout=UPLOAD_TIMEOUT)
    with running(create_app(settings)) as url:
        yield url


# --- the shared mechanism -------------------------------------------------------------------


def test_a_deadline_cuts_a_blocked_read_and_leaves_finished_sockets_alone():
    reader, writer = socket.socketpair()
    kept, peer = socket.socketpair()
    with reader, writer, kept, peer:
        reader.settimeout(HOLD)  # fails the test, rather than hanging it, if nothing cuts the read
        with deadline(0.3) as guard:
            assert current() is guard
            guard.attach(reader)
            assert reader.recv(1) == b""  # blocked until the watchdog shut the socket down
        assert guard.expired and current() is None
        with deadline(0.05) as quick:
            quick.attach(kept)
        time.sleep(0.2)  # past that deadline: a finished exchange's socket is left alone (it may be pooled)
        peer.sendall(b"y")
        assert kept.recv(1) == b"y" and not quick.expired


# --- remote fetches ---------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "scheme"), [
    ("/headers.png", "http"), ("/body.png", "http"), ("/silent.png", "http"),
    ("/silent.png", "https"),  # the TLS handshake is never answered
])
def test_a_trickling_or_silent_image_server_is_cut_at_the_remote_timeout(service, trickler, path, scheme):
    url = trickler.url(path, scheme)
    started = time.monotonic()
    response = httpx.post(service + "/predict", json={"url": url}, timeout=HOLD + 10)
    elapsed = time.monotonic() - started

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "remote_timeout" and url in error["message"] and "1.5 s" in error["message"]
    assert elapsed < REMOTE_TIMEOUT + 1, f"answered after {elapsed:.2f} s"
    # ...and the service let go of the connection (no worker left reading it).
    ended = trickler.wait_ended(within=3)
    assert ended is not None and ended < REMOTE_TIMEOUT + 1.5, ended


# --- slow uploads -------------------------------------------------------------------------------


def multipart(image: bytes, boundary: str) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_client_that_trickles_its_upload_gets_408_and_a_closed_connection(service):
    body = multipart(images.rgb_png(3), "b0undary")
    assert len(body) * UPLOAD_DRIP > HOLD  # the client would go on far past the upload timeout
    host, port = service.removeprefix("http://").split(":")
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=HOLD) as sock:
        started = time.monotonic()
        sock.sendall(head)
        for at in range(len(body)):
            if select.select([sock], [], [], UPLOAD_DRIP)[0]:
                break  # the service answered (or closed): stop sending
            try:
                sock.sendall(body[at:at + 1])
            except OSError:
                break
        answer = read_until_closed(sock)  # returns only once the service closes the connection
        elapsed = time.monotonic() - started

    head_part, _, payload = answer.partition(b"\r\n\r\n")
    status_line, *headers = head_part.decode("latin-1").split("\r\n")
    assert status_line.startswith("HTTP/1.1 408"), answer[:300]
    assert "connection: close" in (header.lower() for header in headers)
    error = json.loads(payload)["error"]
    assert error["code"] == "upload_timeout" and "1 s" in error["message"]
    assert elapsed < UPLOAD_TIMEOUT + 1, f"answered after {elapsed:.2f} s"


def test_an_upload_that_arrives_in_time_is_answered_as_usual(service):
    response = httpx.post(service + "/predict", files={"image": ("a.png", images.rgb_png(4), "image/png")},
                          timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["label"]
