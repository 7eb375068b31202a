"""Download and pack on a real two-node Ray cluster on loopback: the same bytes as this machine's
worker processes give, and the same bytes again when a worker node is killed mid-run.

The cluster (``tests.ray_cluster``) has a head and a worker node of one CPU each, every process
on 127.0.0.1 with a token; the stages run as ``dvc repro`` would run them, as subprocesses told
the cluster's address, against an HTTP server on loopback and a local folder.
"""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import http_server as hs
from tests import images
from tests.ray_cluster import REPO, two_node_cluster
from tests.shard_files import folder_bytes, kept_images

pytestmark = pytest.mark.slow  # each test needs the two-node cluster (about 25 s to start)

URLS = 48  # served slowly, so that tasks overlap and both nodes get some
LATENCY_S = 0.15
PARAMS = """\
download:
  fetches_per_core: 2
  rows_per_task: 4
  min_side: 16
  min_images_per_class: 1
pack:
  image_size: 32
  shard_size: 20
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):  # type: ignore[no-untyped-def]
    with two_node_cluster(tmp_path_factory) as running:
        yield running


@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    with hs.Server() as running:
        for i in range(URLS):
            running.routes[f"/{i}.png"] = hs.slow(images.rgb_png(i), LATENCY_S)
        running.routes["/dup.png"] = hs.body(images.rgb_png(3))  # same bytes as /3.png
        running.routes["/text.jpg"] = hs.body(b"not an image at all")
        yield running


@pytest.fixture(scope="module")
def sources(tmp_path_factory, server) -> Path:  # type: ignore[no-untyped-def]
    """A manifest of loopback URLs (two classes, a duplicate, a text file, a 404) and a folder class."""
    root = tmp_path_factory.mktemp("sources")
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "label"])
        writer.writerows([server.url(f"/{i}.png"), "ab"[i % 2]] for i in range(URLS))
        writer.writerows([[server.url("/dup.png"), "b"], [server.url("/text.jpg"), "a"],
                          [server.url("/missing.png"), "a"]])
    for i in range(6):
        folder = root / "local" / "c"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(images.rgb_jpeg(100 + i))
    (root / "params.yaml").write_text(PARAMS)
    return root


def without_ray(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith("RAY_")}


def stage(name: str, sources: Path, work: Path, env: dict[str, str], *flags: str) -> subprocess.Popen:
    """``python -m stages.NAME`` as dvc.yaml runs it, in ``work``, left running."""
    work.mkdir(parents=True, exist_ok=True)
    args = {
        "download": ["--manifest", str(sources / "manifest.csv"), str(sources / "local"), "--out", "images",
                     "--report", "reports/download/metrics.json", "--cache-dir", "cache", "--log", "download.log"],
        "pack": ["--images", "images", "--out", "tfrecords", "--report", "reports/pack/metrics.json"],
    }[name]
    return subprocess.Popen([sys.executable, "-m", f"stages.{name}", "--params", str(sources / "params.yaml"),
                             *args, *flags], cwd=work,
                            # A home of its own: TensorFlow and Matplotlib write caches there, and the
                            # cluster checks that Ray writes nothing in its nodes' home.
                            env={**env, "PYTHONPATH": str(REPO), "HOME": str(work / "home")},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 180) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out}\n{err}"
    assert "Traceback" not in err, err
    return out


def outputs(work: Path) -> dict[str, bytes]:
    """Everything the two stages track in DVC: shards, TFRecords and reports."""
    return {f"{folder}/{name}": data for folder in ("images", "tfrecords", "reports")
            for name, data in folder_bytes(work / folder).items()}


class TaskWatch:
    """Which nodes ran download tasks: Ray names a worker process after the task it runs."""

    def __init__(self, cluster) -> None:  # type: ignore[no-untyped-def]
        self.cluster, self.seen, self._stop = cluster, set(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for process, role in self.cluster.owned().items():
                try:
                    if "check_chunk" in " ".join(process.cmdline()):
                        self.seen.add(role)
                except Exception:  # the process ended while being looked at
                    pass
            time.sleep(0.05)

    def __enter__(self) -> TaskWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def one_machine(sources, tmp_path_factory) -> dict[str, bytes]:
    """What the stages write on this machine's worker processes (the default engine)."""
    work = tmp_path_factory.mktemp("processes")
    env = without_ray(dict(os.environ))
    assert "on 2 processes" in finish(stage("download", sources, work, env, "--processes", "2"))
    assert "on 2 processes" in finish(stage("pack", sources, work, env, "--processes", "2"))
    return outputs(work)


def test_download_and_pack_on_two_nodes_write_the_bytes_one_machine_writes(cluster, sources, one_machine, tmp_path):
    work = tmp_path / "cluster"
    env = cluster.env | {"RAY_ADDRESS": cluster.address}  # as `RAY_ADDRESS=... dvc repro` would
    with TaskWatch(cluster) as watch:
        summary = finish(stage("download", sources, work, env))
    assert "on Ray, 2 CPUs" in summary
    assert watch.seen >= {"head", "worker"}, f"download tasks ran only on {watch.seen}"
    assert "on Ray, 2 CPUs" in finish(stage("pack", sources, work, env))

    assert outputs(work) == one_machine
    kept = kept_images(work / "images")
    assert len(kept) == URLS + 6 and {name.split("/")[0] for name in kept} == {"a", "b", "c"}


def test_a_killed_coordinator_leaves_no_shard_and_the_rerun_fetches_only_the_rest(cluster, sources, one_machine,
                                                                                 server, tmp_path):
    work = tmp_path / "coordinator"
    cache = work / "cache" / "urls"
    proc = stage("download", sources, work, cluster.env, "--ray-address", cluster.address)
    deadline = time.monotonic() + 60
    while sum(1 for p in cache.rglob("*") if p.is_file()) < URLS // 3:  # some tasks are back
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no task came back"
        time.sleep(0.02)
    proc.kill()
    proc.communicate()
    assert not (work / "images").exists()  # shards appear whole at the end, or not at all
    key = {i: hashlib.sha256(server.url(f"/{i}.png").encode()).hexdigest() for i in range(URLS)}
    cached = {i for i, k in key.items() if (cache / k[:2] / k).is_file()}
    assert 0 < len(cached) < URLS

    hits_before = {i: server.hits[f"/{i}.png"] for i in range(URLS)}
    finish(stage("download", sources, work, cluster.env, "--ray-address", cluster.address))
    fetched_again = {i for i in range(URLS) if server.hits[f"/{i}.png"] > hits_before[i]}
    assert fetched_again == set(range(URLS)) - cached  # what the first run validated was not fetched again
    assert folder_bytes(work / "images") == {k.removeprefix("images/"): v for k, v in one_machine.items()
                                            if k.startswith("images/")}


def test_a_worker_node_killed_mid_download_costs_only_its_tasks(cluster, sources, one_machine, server, tmp_path):
    """Runs last in this module: it kills the cluster's worker node."""
    work = tmp_path / "killed"
    hits_before = sum(server.hits[f"/{i}.png"] for i in range(URLS))
    with TaskWatch(cluster) as watch:
        proc = stage("download", sources, work, cluster.env, "--ray-address", cluster.address)
        deadline = time.monotonic() + 60
        while "worker" not in watch.seen:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no task reached the worker node"
            time.sleep(0.02)
        cluster.kill_worker()  # with tasks of its own under way
        finish(proc)
    assert "on Ray, " in finish(stage("pack", sources, work, cluster.env, "--ray-address", cluster.address))

    assert outputs(work) == one_machine
    # Only the lost tasks' rows were fetched twice, not the whole list again.
    refetched = sum(server.hits[f"/{i}.png"] for i in range(URLS)) - hits_before - URLS
    assert refetched < URLS / 2
