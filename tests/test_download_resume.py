"""SIGKILL in the middle of a download: nothing partial is left, and the next run does not refetch."""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests import http_server as hs
from tests import images
from tests.shard_files import kept_images

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ("download:\n  fetches_per_core: 2\n  processes: 2\n  rows_per_task: 2\n  read_timeout: 30.0\n"
          "  deadline: 60.0\n  min_side: 16\n  min_images_per_class: 1\n")


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def processes_in(folder: Path) -> list[int]:
    """Processes whose working directory is ``folder`` (the stage and its worker processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and Path(os.readlink(entry / "cwd")) == folder:
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def test_sigkill_leaves_no_partial_file_and_resume_skips_what_was_kept(tmp_path):
    release = threading.Event()
    held = {"/held-1.jpg": images.rgb_jpeg(98), "/held-2.jpg": images.rgb_jpeg(99)}

    def held_back(h: hs.Handler, n: int) -> None:
        release.wait(30)
        hs.send(h, 200, held[h.path], "image/jpeg")

    fast = {f"/fast-{i}.png": images.rgb_png(i) for i in range(8)}
    with hs.Server() as server:
        server.routes.update({path: hs.body(data) for path, data in fast.items()})
        server.routes.update({"/held-1.jpg": held_back, "/held-2.jpg": held_back})
        manifest = tmp_path / "manifest.csv"
        with manifest.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["url", "label"])
            writer.writerows([server.url(path), "ab"[i % 2]] for i, path in enumerate(fast))
            # Last, in a task of their own: a task holds a core until its slowest URL is done.
            writer.writerows([[server.url("/held-1.jpg"), "a"], [server.url("/held-2.jpg"), "b"]])
        (tmp_path / "params.yaml").write_text(PARAMS)
        command = [sys.executable, "-m", "stages.download", "--params", "params.yaml",
                   "--manifest", "manifest.csv", "--out", "images", "--report", "report/metrics.json"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}

        first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        cached = lambda: sum(p.is_file() for p in (tmp_path / ".cache/download/urls").rglob("*"))  # noqa: E731
        try:
            wait_for(lambda: cached() == len(fast))
            assert first.poll() is None, "the first run should still wait for the held URLs"
            # The stage, the fork server and its two workers (and multiprocessing's resource tracker).
            assert len(processes_in(tmp_path)) >= 4
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        wait_for(lambda: processes_in(tmp_path) == [], timeout=5)  # workers die with their parent

        out = tmp_path / "images"
        assert not out.exists()  # shards appear all at once, at the end, or not at all
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".images")] == []

        release.set()
        second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stderr
        assert "2 fetched over the network" in second.stdout
        assert all(server.hits[p] == 1 for p in fast), dict(server.hits)
        assert server.hits["/held-1.jpg"] == 2 and server.hits["/held-2.jpg"] == 2
        kept = sorted(kept_images(out))
        expected = [f"{'ab'[i % 2]}/{hashlib.sha256(d).hexdigest()}.png" for i, d in enumerate(fast.values())]
        expected += [f"{label}/{hashlib.sha256(held[path]).hexdigest()}.jpg" for path, label in
                     [("/held-1.jpg", "a"), ("/held-2.jpg", "b")]]
        assert kept == sorted(expected)
