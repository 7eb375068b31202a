"""Where the data stages' work runs: worker processes on this machine, or a Ray cluster.

Both stages cut their work into tasks (a chunk of manifest rows, a batch of images to letterbox)
that are pure functions of their arguments: a task never touches the output folder and returns
what it made. ``Distributor.map`` runs them with a bounded number in flight and yields results in
submission order, so memory stays bounded and nothing downstream depends on timing or on how
many machines ran. Image bytes travel in the arguments and results, never through a shared file
system: Ray's workers may be other machines.

Two engines, as img2dataset has its distributors:

- ``processes`` (the default without a Ray address): a process pool on this machine. Starting
  a local Ray costs several seconds (measured in bench/download.py), more than a whole
  2,000-image download, so the single machine keeps the pool.
- ``ray``: Ray tasks on the cluster at ``--ray-address`` / ``RAY_ADDRESS``, or on a Ray that the
  stage starts for itself. That one listens on 127.0.0.1 only, without a dashboard and with a
  random token: Ray's ports run any code sent to them. A task on a node that dies is retried
  elsewhere by Ray (tasks are pure, so a retry gives the same bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import multiprocessing
import os
import queue
import re
import secrets
import select
import shutil
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Protocol, TypeVar

import imgpipe
from imgpipe.errors import StageError

Item = TypeVar("Item")
Result = TypeVar("Result")

ENGINES = ("processes", "ray")
ADDRESS_ENV = "RAY_ADDRESS"  # Ray's own variable: `ray.init` reads it too
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20  # tasks in flight are bounded, so a small store suffices; it spills to disk
PACKAGE = Path(imgpipe.__file__).parent
TASK_RETRIES = 3  # on a worker or node that died (never on an exception a task raised: that is a bug)


class TaskFailed(StageError):
    """A task raised or its worker died: a one-line message, and the traceback when there is one."""

    def __init__(self, message: str, traceback_text: str = "") -> None:
        super().__init__(message)
        self.traceback_text = traceback_text


class Distributor(Protocol):
    engine: str
    cpus: int  # CPU cores the tasks can use, across every node

    def map(self, fn: Callable[..., Result], args: Iterable[tuple], in_flight: int = 0,
            on_result: Callable[[Result], Result] | None = None) -> Iterator[Result]:
        """``fn(*a)`` for each ``a`` in ``args``, yielded in submission order; at most
        ``in_flight`` (default: twice the cores) submitted and not yet yielded. ``on_result``
        sees each result as soon as it arrives, in completion order, and returns what to keep
        for the ordered yield (so a slow task does not hold up saving what the others made)."""
        ...

    def close(self) -> None: ...


def one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def run_threads(fn: Callable[[Item], Result], items: Iterable[Item], threads: int,
                name: str = "worker") -> Iterator[Result]:
    """Like ``pool.map`` with at most ``2 * threads`` items in flight, yielding as they finish.

    Finished futures arrive through a queue rather than ``concurrent.futures.wait``, whose cost
    grows with the number of pending futures.
    """
    finished: queue.SimpleQueue[Future[Result]] = queue.SimpleQueue()
    slots = threading.Semaphore(2 * threads)

    def on_done(future: Future[Result]) -> None:
        slots.release()
        finished.put(future)

    in_flight = 0
    with ThreadPoolExecutor(threads, thread_name_prefix=name) as pool:
        try:
            for item in items:
                while not slots.acquire(blocking=False):
                    in_flight -= 1
                    yield finished.get().result()
                in_flight += 1
                pool.submit(fn, item).add_done_callback(on_done)
            for _ in range(in_flight):
                yield finished.get().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _ordered(submit: Callable[[tuple], Any], wait_any: Callable[[list], list], get: Callable[[Any], Result],
             args: Iterable[tuple], in_flight: int, on_result: Callable[[Result], Result] | None) -> Iterator[Result]:
    """The engines' common loop: submit up to ``in_flight``, take results as they complete, yield in order."""
    keep = on_result or (lambda result: result)
    pending: dict[Any, int] = {}  # handle -> submission number
    ready: dict[int, Result] = {}
    submitted = yielded = 0
    args = iter(args)
    exhausted = False
    while True:
        while not exhausted and submitted - yielded < in_flight:
            a = next(args, None)
            if a is None:
                exhausted = True
                break
            pending[submit(a)] = submitted
            submitted += 1
        if yielded == submitted:
            return
        while yielded not in ready:
            for handle in wait_any(list(pending)):
                ready[pending.pop(handle)] = keep(get(handle))
        while yielded in ready:
            yield ready.pop(yielded)
            yielded += 1


class InProcess:
    """One process, no pool: for ``processes: 1`` and for tests that step through a task."""

    engine = "processes"
    cpus = 1

    def map(self, fn: Callable[..., Result], args: Iterable[tuple], in_flight: int = 0,
            on_result: Callable[[Result], Result] | None = None) -> Iterator[Result]:
        keep = on_result or (lambda result: result)
        for a in args:
            try:
                result = fn(*a)
            except StageError:
                raise
            except Exception as exc:
                raise TaskFailed(f"a task failed: {one_line(exc)}", "".join(traceback.format_exception(exc))) from None
            yield keep(result)

    def close(self) -> None:
        pass


def _die_with_stage(stage_pid: int) -> None:
    """A worker must not go on fetching for a stage that was killed. Its parent is the fork
    server, which only exits once its workers have: so each worker watches the stage itself."""

    def watch() -> None:
        try:
            select.select([os.pidfd_open(stage_pid)], [], [])  # readable once the stage has exited
        except (AttributeError, OSError):  # no pidfd here: poll
            while _alive(stage_pid):
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="watch-stage", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Processes:
    """A pool of worker processes on this machine (a fork server: the stage's threads are not copied)."""

    engine = "processes"

    def __init__(self, processes: int, preload: tuple[str, ...] = ()) -> None:
        self.cpus = processes
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        if method == "forkserver":
            context.set_forkserver_preload(list(preload))
        self._pool = ProcessPoolExecutor(processes, mp_context=context, initializer=_die_with_stage,
                                         initargs=(os.getpid(),))

    def map(self, fn: Callable[..., Result], args: Iterable[tuple], in_flight: int = 0,
            on_result: Callable[[Result], Result] | None = None) -> Iterator[Result]:
        def get(future: Future[Result]) -> Result:
            try:
                return future.result()
            except BrokenProcessPool:
                raise TaskFailed("a worker process died (killed, or out of memory)") from None
            except StageError:
                raise
            except Exception as exc:
                # The worker's traceback travels as the exception's cause (_RemoteTraceback).
                details = str(exc.__cause__ or "") or "".join(traceback.format_exception(exc))
                raise TaskFailed(f"a worker process failed: {one_line(exc)}", details) from None

        def wait_any(futures: list[Future[Result]]) -> list[Future[Result]]:
            return list(wait(futures, return_when=FIRST_COMPLETED).done)

        return _ordered(lambda a: self._pool.submit(fn, *a), wait_any, get, args, in_flight or 2 * self.cpus,
                        on_result)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _prepare_ray(local: bool) -> Any:
    """Import Ray with the settings every use here needs (before any node or driver starts)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report sent anywhere
    if local:
        # A token as well as loopback: other users of this machine cannot send it code either.
        # Ray reads it when first imported, and keeps it out of ~/.ray when given this way.
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    import ray
    import ray._private.node
    import ray._private.services

    # Ray rewrites 127.0.0.1 to the machine's network address when it starts or joins a node,
    # which would expose a local Ray and take a loopback test cluster off loopback: keep what
    # we are told. The dashboard's API server is never wanted (with include_dashboard=False
    # Ray 2.60 still starts it, and it probes the cloud metadata address).
    ray._private.services.resolve_ip_for_localhost = lambda host: host
    ray._private.node.Node.start_api_server = lambda self, *args, **kwargs: None
    return ray


def split_address(address: str) -> tuple[str, int | None]:
    """(host, port) of a Ray address ("10.0.0.5:6379", "[::1]:6379", "ray://host:port"); the
    port is None when there is none ("localhost", "::1", "auto")."""
    rest = address.split("://")[-1]
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(rest.strip("[]"))), None  # a bare address: its colons are not a port
    host, colon, port = rest.rpartition(":")
    if not colon or not port.isdigit():
        return rest.strip("[]"), None
    return host.strip("[]"), int(port)


def is_loopback(address: str) -> bool:
    """Whether a Ray address is this machine's loopback."""
    host, _ = split_address(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _plain(text: str) -> str:
    """Ray's tracebacks without their terminal colours (they go to a JSON log)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    host, port = split_address(address)
    if port is None:
        return  # "auto" and the like: Ray finds the cluster itself
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise StageError(f"cannot reach the Ray cluster at {address}: {one_line(exc)}") from None


class Ray:
    """Ray tasks, on the cluster at ``address`` or on a Ray started here on 127.0.0.1."""

    engine = "ray"

    def __init__(self, address: str | None, cpus: int) -> None:
        if address:
            # Before Ray is imported: else Ray retries for a quarter of an hour, then raises a
            # traceback; and an import with a cluster's settings would stay for a local Ray later.
            _check_reachable(address)
        self._ray = ray = _prepare_ray(local=not address)
        self._temp: Path | None = None
        quiet = dict(log_to_driver=False, logging_level="WARNING", configure_logging=True)
        if address:
            node = {"_node_ip_address": "127.0.0.1"} if is_loopback(address) else {}
            # Workers import imgpipe from this checkout, whatever the nodes have installed.
            runtime_env = {"py_modules": [str(PACKAGE)], "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}
            try:
                ray.init(address=address, runtime_env=runtime_env, **node, **quiet)
            except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ... with pages of detail
                raise StageError(f"cannot join the Ray cluster at {address}: {one_line(exc)} (is it running, "
                                 "and is RAY_AUTH_TOKEN its token?)") from None
            self.address = address
        else:
            # The local workers are children of this process: they import imgpipe from the same
            # checkout through PYTHONPATH (shipping it as a runtime env costs seconds per run).
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [str(PACKAGE.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
            # Short: Ray's socket paths must fit in 107 bytes.
            self._temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
            try:
                ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=cpus,
                         object_store_memory=LOCAL_OBJECT_STORE_BYTES, _temp_dir=str(self._temp), **quiet)
            except Exception as exc:
                shutil.rmtree(self._temp, ignore_errors=True)
                raise StageError(f"could not start a local Ray: {one_line(exc)}") from None
            self.address = "local"
        self.cpus = int(ray.cluster_resources().get("CPU", 1))

    def map(self, fn: Callable[..., Result], args: Iterable[tuple], in_flight: int = 0,
            on_result: Callable[[Result], Result] | None = None) -> Iterator[Result]:
        ray = self._ray
        remote = ray.remote(fn).options(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=False)

        def wait_any(refs: list) -> list:
            return ray.wait(refs, num_returns=1)[0]

        def get(ref: Any) -> Result:
            try:
                return ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                if isinstance(cause, StageError):
                    raise cause from None
                raise TaskFailed(f"a Ray task failed: {one_line(cause)}", _plain(str(exc))) from None
            except ray.exceptions.RayError as exc:  # worker or node lost after every retry
                raise TaskFailed(f"a Ray task was lost after {TASK_RETRIES} retries: {one_line(exc)}",
                                 _plain(str(exc))) from None

        return _ordered(lambda a: remote.remote(*a), wait_any, get, args, in_flight or 2 * self.cpus, on_result)

    def close(self) -> None:
        self._ray.shutdown()
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Where a data stage's tasks run: flags, not parameters, since the output is the same bytes
    on any engine, so they stay out of params.yaml and dvc.lock."""
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help=f"processes on this machine, or Ray (default: Ray when --ray-address or {ADDRESS_ENV} "
                             "is set, else processes)")
    parser.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                        help=f"a running Ray cluster (default: ${ADDRESS_ENV}); --engine ray without one "
                             "starts a private Ray on 127.0.0.1")


def describe(engine: Distributor) -> str:
    """Where the tasks ran, for a stage's summary line."""
    if engine.engine == "ray":
        return f"on Ray, {engine.cpus} CPU{'s' if engine.cpus != 1 else ''}"
    return f"on {engine.cpus} process{'es' if engine.cpus != 1 else ''}"


def resolve_engine(engine: str | None, address: str | None) -> tuple[str, str | None]:
    """The engine and Ray address a stage uses: ``--ray-address`` or ``RAY_ADDRESS`` mean Ray."""
    address = address or os.environ.get(ADDRESS_ENV) or None
    if engine is None:
        engine = "ray" if address else "processes"
    if engine == "processes" and address:
        raise StageError(f"--engine processes with a Ray address ({address}): drop one of them "
                         f"(unset {ADDRESS_ENV} to run on this machine's processes)")
    return engine, address


@contextlib.contextmanager
def distributor(engine: str | None, address: str | None, processes: int,
                preload: tuple[str, ...] = ()) -> Iterator[Distributor]:
    """The engine to run tasks on, closed afterwards. ``processes``: cores of this machine to
    use when the stage runs here (0 = all); a cluster brings its own."""
    engine, address = resolve_engine(engine, address)
    cores = processes or os.cpu_count() or 1
    if engine == "ray":
        chosen: Distributor = Ray(address, cores)
    elif cores == 1:
        chosen = InProcess()
    else:
        chosen = Processes(cores, preload)
    try:
        yield chosen
    finally:
        chosen.close()
