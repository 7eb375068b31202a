"""Where the data stages' tasks run: the process pool, a Ray started on this machine, and a real
two-node Ray cluster on 127.0.0.1 (one start-up for the module) that loses its worker node mid-map.

Ray runs only in subprocesses (``tests.ray_cluster``): Ray reads its settings when imported, and
they must stay out of this process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from imgpipe.distribute import InProcess, Processes, TaskFailed, distributor, is_loopback, resolve_engine
from imgpipe.errors import StageError
from tests.ray_cluster import (
    NODE_ENV,
    RELEASE,
    REPO,
    driver,
    listeners,
    off_loopback,
    raise_on,
    stage_error_on,
    start_driver,
    two_node_cluster,
)


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch):
    """A RAY_ADDRESS of the developer's would send every engine-less distributor to Ray."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


# --- tasks for the process pool (module level: the workers import them) ---------------------


def square_after(i: int, pause: float) -> tuple[int, int]:
    time.sleep(pause)
    return i * i, os.getpid()


def timed(i: int, pause: float) -> tuple[float, float]:
    start = time.monotonic()  # one clock for every process of the machine
    time.sleep(pause)
    return start, time.monotonic()


def first_waits_for(i: int, gate: str) -> int:
    deadline = time.monotonic() + 30
    while i == 0 and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return i * i


def die_on(i: int, bad: int) -> int:
    if i == bad:
        os._exit(7)  # a crash that skips all cleanup, like the OOM killer
    time.sleep(0.05)
    return i


# --- the process pool ------------------------------------------------------------------------


def test_processes_yield_in_submission_order_from_several_workers():
    # Later items finish first: the order comes from submission, not from timing.
    args = [(i, 0.02 * (8 - i)) for i in range(8)]
    with distributor(None, None, 3) as engine:
        assert isinstance(engine, Processes) and engine.engine == "processes" and engine.cpus == 3
        results = list(engine.map(square_after, args))
    assert [r for r, _ in results] == [i * i for i in range(8)]
    assert len({pid for _, pid in results} - {os.getpid()}) > 1


def test_processes_bound_what_is_in_flight():
    pulled = 0

    def args():
        nonlocal pulled
        for i in range(12):
            pulled += 1
            yield i, 0.1

    with distributor("processes", None, 4) as engine:
        spans = []
        for k, span in enumerate(engine.map(timed, args(), in_flight=2)):
            assert pulled <= k + 2  # result k out: at most itself and one more submitted
            spans.append(span)
    # Four workers, but never more than two tasks running at once.
    running = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert running == 2
    assert len(spans) == 12


def test_processes_default_in_flight_is_twice_the_cores():
    pulled = 0

    def args():
        nonlocal pulled
        for i in range(20):
            pulled += 1
            yield i, 0.0

    with distributor("processes", None, 2) as engine:
        first = next(iter(engine.map(timed, args())))
        assert first and pulled == 2 * 2


def test_on_result_sees_results_as_they_arrive_and_keeps_what_it_returns(tmp_path):
    gate = tmp_path / "gate"
    arrived = []

    def keep(result: int) -> int:
        arrived.append(result)
        gate.touch()  # the first task finishes only once another result has arrived
        return -result

    with distributor(None, None, 3) as engine:
        kept = list(engine.map(first_waits_for, [(i, str(gate)) for i in range(6)], in_flight=6, on_result=keep))
    assert kept == [-i * i for i in range(6)]  # what on_result returned, in submission order
    assert sorted(arrived) == [i * i for i in range(6)] and arrived[0] != 0  # in completion order


def test_on_result_in_process():
    arrived = []
    with distributor(None, None, 1) as engine:
        kept = list(engine.map(square_after, [(i, 0) for i in range(4)], on_result=lambda r: arrived.append(r) or r[0]))
    assert kept == [0, 1, 4, 9] and [r[0] for r in arrived] == kept


def test_a_task_that_raises_is_one_line_with_its_traceback():
    with distributor(None, None, 2) as engine, pytest.raises(TaskFailed) as failed:
        list(engine.map(raise_on, [(i, 3) for i in range(6)]))
    message = str(failed.value)
    assert message == "a worker process failed: ValueError: item 3 is bad"
    assert "Traceback" in failed.value.traceback_text and "in raise_on" in failed.value.traceback_text
    assert "second line" in failed.value.traceback_text
    assert isinstance(failed.value, StageError)


def test_a_stage_error_from_a_task_passes_through_unchanged():
    with distributor(None, None, 2) as engine, pytest.raises(StageError) as failed:
        list(engine.map(stage_error_on, [(i, 1) for i in range(4)]))
    assert type(failed.value) is StageError and str(failed.value) == "image 1 is not an image"


def test_a_worker_process_that_dies_is_a_task_failure():
    with distributor(None, None, 2) as engine, pytest.raises(TaskFailed) as failed:
        list(engine.map(die_on, [(i, 2) for i in range(6)]))
    assert str(failed.value) == "a worker process died (killed, or out of memory)"


def test_one_process_runs_the_tasks_here():
    with distributor(None, None, 1) as engine:
        assert isinstance(engine, InProcess) and engine.cpus == 1
        assert list(engine.map(square_after, [(i, 0) for i in range(3)])) == [(0, os.getpid()), (1, os.getpid()),
                                                                             (4, os.getpid())]
        with pytest.raises(TaskFailed) as failed:
            list(engine.map(raise_on, [(i, 1) for i in range(3)]))
        assert str(failed.value) == "a task failed: ValueError: item 1 is bad"
        assert "in raise_on" in failed.value.traceback_text
        with pytest.raises(StageError, match="^image 0 is not an image$"):
            list(engine.map(stage_error_on, [(0, 0)]))


# --- choosing the engine ---------------------------------------------------------------------


def test_resolve_engine(monkeypatch):
    assert resolve_engine(None, None) == ("processes", None)
    assert resolve_engine("ray", None) == ("ray", None)  # a Ray started here
    assert resolve_engine(None, "10.0.0.5:6379") == ("ray", "10.0.0.5:6379")
    assert resolve_engine("ray", "10.0.0.5:6379") == ("ray", "10.0.0.5:6379")
    with pytest.raises(StageError, match=r"^--engine processes with a Ray address \(10.0.0.5:6379\)"):
        resolve_engine("processes", "10.0.0.5:6379")
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert resolve_engine(None, None) == ("processes", None)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert resolve_engine(None, None) == ("ray", "127.0.0.1:6379")
    assert resolve_engine(None, "10.0.0.5:6379") == ("ray", "10.0.0.5:6379")  # the flag wins
    with pytest.raises(StageError, match="unset RAY_ADDRESS") as failed:
        resolve_engine("processes", None)
    assert "\n" not in str(failed.value)


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1:6379", True), ("127.0.0.2:6379", True), ("localhost:6379", True), ("ray://127.0.0.1:10001", True),
    ("[::1]:6379", True), ("127.0.0.1", True), ("10.0.0.5:6379", False), ("192.0.2.2:6379", False),
    ("0.0.0.0:6379", False), ("[::]:6379", False), ("head.example.org:6379", False), ("ray://10.1.2.3:10001", False),
    ("auto", False), ("", False),
])
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback


# --- Ray ---------------------------------------------------------------------------------------


def report(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def leftovers(marker: str, temp: str) -> list:
    """Processes with ``marker`` in their environment or a file open under ``temp``."""
    left = []
    for p in psutil.process_iter():
        try:
            if p.status() == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
                continue
            if p.environ().get(NODE_ENV) == marker or any(f.path.startswith(temp) for f in p.open_files()):
                left.append((p.pid, p.name()))
        except psutil.Error:
            pass
    return left


@pytest.mark.slow
def test_a_local_ray_is_loopback_only_keeps_order_and_leaves_nothing(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    marker = f"local-{os.getpid()}-{time.monotonic_ns()}"  # inherited by the Ray it starts
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), **{NODE_ENV: marker})
    done = report(driver(env, "map", "local", "12", "failures"))
    assert [r[0] for r in done["results"]] == [i * i for i in range(12)]
    assert done["cpus"] == 2 and done["nodes"] == 1
    names = {name for name, *_ in done["listeners"]}
    assert {"gcs_server", "raylet"} <= names, done["listeners"]
    assert off_loopback(done["listeners"]) == []
    assert done["temp"].startswith("/tmp/ray-") and not Path(done["temp"]).exists()
    assert list(home.iterdir()) == []  # no ~/.ray/auth_token: the token came by environment
    assert leftovers(marker, done["temp"]) == []

    # Failing tasks (tests.ray_cluster._failures): one line each, the remote traceback kept.
    failed = done["failures"]
    assert failed["raises"]["raised"] == "TaskFailed"
    assert failed["raises"]["message"] == "a Ray task failed: ValueError: item 1 is bad"
    assert "in raise_on" in failed["raises"]["traceback"] and "second line" in failed["raises"]["traceback"]
    assert failed["stage_error"]["raised"] == "StageError"  # as it was raised: not wrapped in TaskFailed
    assert failed["stage_error"]["message"] == "image 1 is not an image"
    # A worker that dies is retried (it might have been a lost node), then reported in one line.
    assert failed["dies"]["raised"] == "TaskFailed"
    assert failed["dies"]["message"].startswith("a Ray task was lost after 3 retries: WorkerCrashedError: ")
    assert "\n" not in failed["dies"]["message"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Stopping it checks that none of its processes survived and that Ray wrote nothing in ~.
    with two_node_cluster(tmp_path_factory) as running:
        yield running


def wait_for_start(markers: Path, role: str, proc: subprocess.Popen, timeout: float = 60) -> list[str]:
    """The markers of the tasks started on ``role``'s node, once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = [m.name for m in markers.iterdir() if m.name.split("-")[1:2] == [role]]
        if found:
            return found
        time.sleep(0.02)
    _, err = proc.communicate(timeout=30) if proc.poll() is not None else ("", "")
    raise AssertionError(f"no task started on the {role} node: {sorted(m.name for m in markers.iterdir())}\n"
                         f"{err[-3000:]}")


def finish(proc: subprocess.Popen, timeout: float = 90) -> dict:
    out, err = proc.communicate(timeout=timeout)
    return report(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))


@pytest.mark.slow
def test_cluster_runs_tasks_on_both_nodes_in_order_on_loopback_only(cluster, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    proc = start_driver(cluster.env, "map", cluster.address, "40", str(markers))
    # Each started task holds its node's one CPU until released, so Ray has to send tasks to both
    # nodes; which one gets the first is Ray's choice (a busy CI machine has seen the worker get
    # it while the head was still starting its worker process), so wait for a task on each.
    wait_for_start(markers, "worker", proc)
    wait_for_start(markers, "head", proc)
    # With tasks running on both nodes: every socket of the cluster (the driver, the nodes'
    # daemons and workers) listens on loopback.
    owned = cluster.owned()
    found = listeners(list(owned))
    # And none of them takes a call without the cluster's token.
    gcs_port = int(cluster.address.rsplit(":", 1)[1])
    auth = report(driver({k: v for k, v in cluster.env.items() if not k.startswith("RAY_")}, "auth", str(gcs_port),
                         cluster.token, *sorted({str(port) for *_, port in found})))
    (markers / RELEASE).touch()
    done = finish(proc)

    assert set(owned.values()) == {"head", "worker", "driver"}
    assert off_loopback(found) == [], found
    assert gcs_port in {port for *_, port in found}
    assert {port: verdict for port, verdict in auth["ports"].items() if verdict != "token"} == {}, found
    assert auth["gcs_with_token"] == "OK"
    assert off_loopback(done["listeners"]) == []
    results = done["results"]
    assert [r[0] for r in results] == [i * i for i in range(40)]
    nodes = {role: {node for _, node, r in results if r == role} for role in ("head", "worker")}
    assert all(len(ids) == 1 for ids in nodes.values()), nodes  # both nodes ran tasks, one id each
    assert nodes["head"] != nodes["worker"]
    assert done["cpus"] == 2 and done["nodes"] == 2
    assert {done["driver_node"]} == nodes["head"]  # a driver on this machine joins the head


@pytest.mark.slow
def test_cluster_loses_its_worker_node_mid_map_and_ray_retries_on_the_head(cluster, tmp_path):
    """Runs last: it kills the module's worker node."""
    n = 8
    markers = tmp_path / "markers"
    markers.mkdir()
    proc = start_driver(cluster.env, "map", cluster.address, str(n), str(markers))
    lost = {int(m.split("-")[0]) for m in wait_for_start(markers, "worker", proc)}
    cluster.kill_worker()  # while its tasks hold their CPU
    killed = time.monotonic()
    (markers / RELEASE).touch()
    done = finish(proc)
    recovered = time.monotonic() - killed

    assert cluster.processes("worker") == []
    results = done["results"]
    assert [r[0] for r in results] == [i * i for i in range(n)]
    # No task finished on the worker node (each held its CPU until after the kill): the ones it
    # was running ran again, on the head.
    assert {role for *_, role in results} == {"head"}
    started = sorted(m.name for m in markers.iterdir() if m.name != RELEASE)
    for i in lost:
        assert any(m.startswith(f"{i}-head-") for m in started), started
    assert recovered < 30, recovered


def test_an_address_where_no_cluster_listens_is_a_one_line_error_in_seconds():
    """Ray itself would retry for a quarter of an hour, then raise a traceback."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening: refused
    started = time.monotonic()
    with pytest.raises(StageError, match=rf"^cannot reach the Ray cluster at {address}: ") as failed:
        with distributor("ray", address, 0):
            pass
    assert "\n" not in str(failed.value)
    assert time.monotonic() - started < 30
