"""`python -m serve` as an operator runs it, signals included: SIGHUP loads a new bundle under
load without a failed request; SIGTERM answers the requests already accepted (one still
uploading when the signal comes) and exits within --drain-seconds."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

from tests import images
from tests.serving import Load, copy_bundle

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the service did not become ready")


def slow_upload(url: str, seconds: float, results: list) -> None:
    """POST /predict whose multipart body trickles in over ``seconds`` (a request in flight)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + images.rgb_png(5) + f"\r\n--{boundary}--\r\n".encode()
    pieces = 10

    def trickle():  # type: ignore[no-untyped-def]
        size = -(-len(body) // pieces)
        for start in range(0, len(body), size):
            yield body[start:start + size]
            time.sleep(seconds / pieces)

    try:
        response = httpx.post(url + "/predict", content=trickle(), timeout=30,
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                                       "Content-Length": str(len(body))})
        results.append(response.status_code)
    except httpx.HTTPError as exc:
        results.append(repr(exc))


def test_sighup_reloads_under_load_and_sigterm_drains_accepted_requests(bundles, tmp_path):
    live = tmp_path / "model"
    copy_bundle(bundles["cam"], live)
    flat_version = json.loads((bundles["flat"] / "metadata.json").read_text())["version"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "serve", "--bundle", str(live), "--port", str(port),
                                "--drain-seconds", "5"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        wait_ready(url, process)
        with Load(url) as load:
            while load.answered < 20:
                time.sleep(0.05)
            copy_bundle(bundles["flat"], live)
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while httpx.get(url + "/metadata").json()["version"] != flat_version:
                assert time.monotonic() < deadline and process.poll() is None, "SIGHUP did not reload"
                time.sleep(0.1)
            seen = load.answered
            while load.answered < seen + 20:
                time.sleep(0.05)
        assert load.failures == [] and flat_version in load.versions

        uploads: list = []
        uploading = [threading.Thread(target=slow_upload, args=(url, 2.0, uploads)) for _ in range(5)]
        for thread in uploading:
            thread.start()
        time.sleep(0.5)  # the requests are accepted and their bodies are on their way
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        for thread in uploading:
            thread.join(30)
        process.wait(30)
        exited = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
    log = process.stderr.read()
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert uploads == [200] * 5, log  # accepted before SIGTERM: answered
    assert exited < 5 + 2, exited  # --drain-seconds, and the process is gone
    assert process.returncode in (0, -signal.SIGTERM), log
    assert any(event.get("event") == "reloaded" and event["model_version"] == flat_version for event in events)
    assert any(event.get("event") == "draining" for event in events)
    assert "Traceback" not in log
