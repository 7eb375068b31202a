"""A real two-node Ray cluster on 127.0.0.1 for the tests, and the drivers and tasks run on it.

``two_node_cluster`` starts a head and one worker node, one CPU each, with ``ray start --block``
through ``tests.ray_node`` (Ray patched to keep 127.0.0.1, with no dashboard API server and no
client server), each in its own session and temp dir under /tmp, with a random auth token and
``HOME`` pointed at a scratch folder. A process is the cluster's when its environment holds the
token (nodes, their workers, drivers run with ``cluster.env``) or when it has a file open in a
node's temp dir (Ray's agents, whose environment is overwritten with their process title):
that is how the tests find the processes whose sockets they inspect, kill the worker node, and
check that none survives.

A driver runs in a subprocess (``python -m tests.ray_cluster map ADDRESS|local N [MARKERS]``)
so that its Ray settings, read when Ray is imported, stay out of the test process; it maps
``probe`` over ``range(N)`` with ``imgpipe.distribute.distributor`` and prints one JSON line.
Never ``ray stop``: it kills every Ray process of the machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
NODE_ENV = "IMGPIPE_TEST_RAY_NODE"  # head, worker or driver: inherited by the node's workers
OBJECT_STORE_BYTES = 100 * 2**20
# A killed node is declared dead after ~1.5 s instead of ~20 s.
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                      "health_check_failure_threshold": 3}
START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(token: str, home: Path) -> dict[str, str]:
    """This environment without Ray's variables, plus what every process of a test cluster needs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               # SIGTERM stops a node at once instead of draining it for up to 30 s.
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               PYTHONPATH=str(REPO), HOME=str(home), PYTHONUNBUFFERED="1")
    return env


def listeners(procs: list[psutil.Process]) -> list[tuple[str, int, str, int]]:
    """(process name, pid, address, port) of each listening TCP socket (IPv4 and IPv6) of ``procs``."""
    found = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    found.append((p.name(), p.pid, c.laddr.ip, c.laddr.port))
    return found


def off_loopback(found: list[tuple[str, int, str, int]]) -> list[tuple[str, int, str, int]]:
    """The listeners bound elsewhere than loopback (0.0.0.0 and :: included)."""
    bad = []
    for name, pid, host, port in found:
        ip = ipaddress.ip_address(host)
        if not (getattr(ip, "ipv4_mapped", None) or ip).is_loopback:  # ::ffff:127.0.0.1 is loopback
            bad.append((name, pid, host, port))
    return bad


def kill(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)  # psutil checks the pid was not reused


class TwoNodeCluster:
    def __init__(self, root: Path, logs: Path) -> None:
        self.root, self.logs = root, logs
        self.token = secrets.token_hex(32)
        self.home = root / "home"
        self.home.mkdir()
        self.env = {**ray_env(self.token, self.home), NODE_ENV: "driver"}
        self.address = ""
        self._nodes: dict[str, subprocess.Popen] = {}

    def _start(self, role: str, *flags: str) -> subprocess.Popen:
        # Ports of our own for the node's agents: left to choose theirs, the agents write them to
        # files that the raylet waits for, for 15 s at most (not configurable), and a busy machine
        # can take longer to start them: the raylet then aborts and the node with it.
        agent_ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-grpc-port",
                                                              "dashboard-agent-listen-port",
                                                              "metrics-export-port", "runtime-env-agent-port")]
        log = open(self.logs / f"{role}.log", "wb")  # the node process keeps its own copy
        with log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.ray_node", "start", "--block", "--node-ip-address=127.0.0.1",
                 "--num-cpus=1", f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats",
                 # No log monitor (drivers run with log_to_driver=False) and no autoscaler monitor:
                 # fewer processes to start on a small machine.
                 "--include-log-monitor=false", "--no-monitor",
                 f"--temp-dir={self.root / role}", *agent_ports, *flags],
                cwd=REPO, env={**self.env, NODE_ENV: role}, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_term_with_parent)
        self._nodes[role] = proc
        return proc

    def _check_running(self, role: str) -> None:
        proc = self._nodes[role]
        if proc.poll() is not None:
            log = (self.logs / f"{role}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the {role} node exited with {proc.returncode}:\n{log}")

    def start(self) -> None:
        """Start both nodes and a driver that waits for them at once: the worker node and the
        driver retry until the head's GCS answers (starting one after the other costs twice)."""
        self.address = f"127.0.0.1:{free_port()}"
        self._start("head", "--head", f"--port={self.address.rsplit(':', 1)[1]}", "--include-dashboard=false",
                    f"--system-config={json.dumps(FAST_HEALTH_CHECKS)}")
        self._start("worker", f"--address={self.address}")
        waiter = start_driver(self.env, "wait", self.address)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S + 30
            while waiter.poll() is None:
                for role in self._nodes:
                    self._check_running(role)  # a node that failed to start fails at once
                if time.monotonic() > deadline:
                    raise RuntimeError("the two nodes did not come up in time")
                time.sleep(0.2)
        finally:
            if waiter.poll() is None:
                waiter.kill()
            _, err = waiter.communicate()
        if waiter.returncode != 0:
            raise RuntimeError(f"the two nodes did not come up:\n{err[-3000:]}")
        written = (self.root / "head" / "ray_current_cluster").read_text().strip()
        assert written == self.address, (written, self.address)

    def processes(self, role: str | None = None) -> list[psutil.Process]:
        """The live processes of the cluster (drivers included), or of one node (``head``, ``worker``)."""
        return [p for p, owner in self.owned().items() if role in (None, owner)]

    def owned(self) -> dict[psutil.Process, str]:
        """The live processes of the cluster, each with its role: ``head``, ``worker`` or ``driver``.

        A process is the cluster's when its environment has the cluster's token, or when it has a
        file open in a node's temp dir: Ray's agents overwrite their environment when they set
        their process title, but they all write logs there.
        """
        found = {}
        for p in psutil.process_iter():
            if p.pid == os.getpid():
                continue
            with contextlib.suppress(psutil.Error):
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                env = p.environ()
                if env.get("RAY_AUTH_TOKEN") == self.token:
                    owner = env.get(NODE_ENV, "")
                else:
                    mine = [Path(f.path) for f in p.open_files() if Path(f.path).is_relative_to(self.root)]
                    owner = mine[0].relative_to(self.root).parts[0] if mine else None
                if owner is not None:
                    found[p] = owner
        return found

    def kill_worker(self) -> None:
        """SIGKILL the worker node: its ``ray start``, raylet, agents and worker processes at once."""
        procs = self.processes("worker")
        assert procs, "no worker node process found"
        kill(procs, signal.SIGKILL)
        self._nodes["worker"].wait(10)
        psutil.wait_procs(procs, timeout=10)

    def stop(self) -> None:
        """SIGTERM each ``ray start`` (it stops its node's processes), then SIGKILL whatever is left."""
        for proc in self._nodes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self._nodes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for _ in range(5):
            left = self.processes()
            if not left:
                break
            kill(left, signal.SIGKILL)
            psutil.wait_procs(left, timeout=5)
        for proc in self._nodes.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
        left = self.processes()
        assert not left, f"cluster processes survived: {[(p.pid, _name(p)) for p in left]}"
        written = [str(f) for f in self.home.rglob("*")]
        assert not written, f"Ray wrote to its home folder: {written}"


def _term_with_parent() -> None:
    """In a node's ``ray start``: SIGTERM (it then stops its node) when the test process dies,
    however it dies, so that a killed test run leaves no cluster behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:120]
    except psutil.Error:
        return "?"


@contextlib.contextmanager
def two_node_cluster(tmp_path_factory) -> Iterator[TwoNodeCluster]:  # type: ignore[no-untyped-def]
    """A running head and worker node on 127.0.0.1, stopped (and checked gone) at exit.

    Ray's temp dirs are short, under /tmp (socket paths must fit in 107 bytes); the nodes' logs
    go to ``tmp_path_factory``, where pytest keeps them for a failed run.
    """
    logs = tmp_path_factory.mktemp("ray-cluster")
    root = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    cluster = TwoNodeCluster(root, logs)
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            # Keep the session logs for a failed run, then drop the temp dirs.
            for role in ("head", "worker"):
                with contextlib.suppress(OSError):
                    shutil.copytree(root / role / "session_latest" / "logs", logs / f"{role}-session-logs")
            shutil.rmtree(root, ignore_errors=True)


# --- drivers and tasks ---------------------------------------------------------------------

RELEASE = "release"  # the file in a markers folder that lets the tasks waiting there finish
HOLD_TIMEOUT_S = 60


def probe(i: int, markers: str) -> tuple[int, str, str]:
    """A task: ``i * i``, the Ray node it ran on and that node's role (``NODE_ENV``).

    With a ``markers`` folder it touches ``markers/i-role-pid`` when it starts (a task that ran
    twice leaves two) and then holds its CPU until ``markers/release`` exists: so the test knows
    where tasks run, and a node's CPU being held makes Ray send the next tasks to the other one,
    however long that one takes to start its workers.
    """
    import ray

    role = os.environ.get(NODE_ENV, "")
    if markers:
        Path(markers, f"{i}-{role}-{os.getpid()}").touch()
        deadline = time.monotonic() + HOLD_TIMEOUT_S
        while not Path(markers, RELEASE).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    return i * i, ray.get_runtime_context().get_node_id(), role


def raise_on(i: int, bad: int) -> int:
    if i == bad:
        raise ValueError(f"item {i} is bad\nsecond line")
    return i


def stage_error_on(i: int, bad: int) -> int:
    if i == bad:
        from imgpipe.errors import StageError

        raise StageError(f"image {i} is not an image")
    return i


def die_on(i: int, bad: int) -> int:
    if i == bad:
        os._exit(7)  # the worker process dies, as when the OOM killer takes it
    return i


def _failures(engine) -> dict:  # type: ignore[no-untyped-def]
    """How ``engine`` reports a task that raises, one that raises StageError, one whose worker dies."""
    from imgpipe.errors import StageError

    found = {}
    for name, task in (("raises", raise_on), ("stage_error", stage_error_on), ("dies", die_on)):
        started = time.monotonic()
        try:
            list(engine.map(task, [(i, 1) for i in range(4)]))
            found[name] = {"raised": None}
        except StageError as exc:
            found[name] = {"raised": type(exc).__name__, "message": str(exc),
                           "traceback": getattr(exc, "traceback_text", None),
                           "seconds": round(time.monotonic() - started, 1)}
    return found


def driver(env: dict[str, str], *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m tests.ray_cluster ARGS`` in ``env`` (a cluster's ``env`` to join it), run to the end."""
    return subprocess.run([sys.executable, "-m", "tests.ray_cluster", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=check)


def start_driver(env: dict[str, str], *args: str) -> subprocess.Popen:
    """``python -m tests.ray_cluster ARGS`` in ``env``, left running."""
    return subprocess.Popen([sys.executable, "-m", "tests.ray_cluster", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_nodes(address: str, nodes: int) -> None:
    from imgpipe.distribute import _prepare_ray

    ray = _prepare_ray(local=False)
    ray.init(address=address, _node_ip_address="127.0.0.1", log_to_driver=False, logging_level="WARNING")
    deadline = time.monotonic() + START_TIMEOUT_S
    # Alive in the GCS, and its CPU in the cluster's resources (what the scheduler spreads over).
    while (sum(n["Alive"] for n in ray.nodes()) < nodes or ray.available_resources().get("CPU", 0) < nodes):
        if time.monotonic() > deadline:
            sys.exit(f"{nodes} nodes not up: {ray.nodes()}")
        time.sleep(0.1)
    ray.shutdown()


# One harmless method of each gRPC service a Ray node serves: the GCS, a raylet's node manager and
# object manager, a worker's core worker. Called with an empty request, without a token.
GRPC_PROBES = ("/ray.rpc.NodeInfoGcsService/GetClusterId", "/ray.rpc.NodeManagerService/GetSystemConfig",
               "/ray.rpc.ObjectManagerService/Pull", "/ray.rpc.CoreWorkerService/NumPendingTasks")


def _grpc_status(port: int, method: str, token: str = "") -> str:
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            channel.unary_unary(method)(b"", metadata=[("authorization", f"Bearer {token}")] if token else None,
                                        timeout=10)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name


def _http_status(port: int) -> str:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            return str(response.status)
    except urllib.error.HTTPError as exc:
        return str(exc.code)
    except OSError as exc:
        return type(exc).__name__


def _auth(gcs_port: int, token: str, ports: list[int]) -> None:
    """Print, as JSON, how each port answers a caller without the token: ``token`` when it
    refuses (gRPC UNAUTHENTICATED, HTTP 401), else what it answered. Also whether the GCS
    answers with the token (the refusals are about the token, not a broken call)."""
    verdicts = {}
    for port in ports:
        codes = {method: _grpc_status(port, method) for method in GRPC_PROBES}
        if "UNAUTHENTICATED" in codes.values() and "OK" not in codes.values():
            verdicts[port] = "token"
        elif set(codes.values()) == {"UNAVAILABLE"}:  # not gRPC: the runtime-env agent speaks HTTP
            status = _http_status(port)
            verdicts[port] = "token" if status == "401" else f"HTTP {status}"
        else:
            verdicts[port] = f"gRPC {codes}"
    print(json.dumps({"ports": verdicts, "gcs_with_token": _grpc_status(gcs_port, GRPC_PROBES[0], token)}))


def _map(address: str, n: int, markers: str, failures: bool) -> None:
    """Map ``probe`` over ``range(n)`` with ``distributor("ray", address)`` and print a JSON report;
    with ``failures``, how failing tasks are reported too."""
    from imgpipe.distribute import distributor
    from tests.ray_cluster import _failures
    from tests.ray_cluster import probe as task  # by reference: the workers import it (PYTHONPATH)

    with distributor("ray", None if address == "local" else address, 2) as engine:
        ray = engine._ray  # type: ignore[attr-defined]
        results = list(engine.map(task, [(i, markers) for i in range(n)]))
        me = psutil.Process()
        report = {"results": results, "cpus": engine.cpus, "nodes": len(ray.nodes()),
                  "driver_node": ray.get_runtime_context().get_node_id(),
                  "temp": str(getattr(engine, "_temp", "") or ""),  # a local Ray's temp dir
                  # The driver's own sockets and, for a local Ray, those of the Ray it started.
                  "listeners": listeners([me, *me.children(recursive=True)])}
        if failures:
            report["failures"] = _failures(engine)
    print(json.dumps(report))


if __name__ == "__main__":
    # wait ADDRESS | map ADDRESS|local N [MARKERS|failures] | auth GCS_PORT TOKEN PORT...
    if sys.argv[1] == "wait":
        _wait_for_nodes(sys.argv[2], 2)
    elif sys.argv[1] == "auth":
        _auth(int(sys.argv[2]), sys.argv[3], [int(port) for port in sys.argv[4:]])
    else:
        last = sys.argv[4] if len(sys.argv) > 4 else ""
        _map(sys.argv[2], int(sys.argv[3]), "" if last == "failures" else last, last == "failures")
