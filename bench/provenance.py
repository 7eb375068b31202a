"""Which run wrote a results file: every bench script stores ``"run": record(...)`` in its JSON.

``make bench`` exports one ``BENCH_RUN_ID`` for all its scripts, so the results files of one
``make bench`` carry the same id; a script run on its own gets an id of its own
(``standalone-...``, ``"make_bench": false``). ``bench.summary`` refuses to put results of
different runs, or of standalone runs, into docs/benchmarks.md.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

ENV = "BENCH_RUN_ID"
ROOT = Path(__file__).resolve().parents[1]


def git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {"cpus": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform(),
            "python": platform.python_version()}


def record(script: str, started: float) -> dict:
    """The run record for a results file; ``started`` is the script's ``time.time()`` at start.

    ``dirty`` says whether tracked files other than the results and docs/benchmarks.md (which ``make bench``
    itself rewrites) differed from ``commit`` when the script finished."""
    run_id = os.environ.get(ENV, "").strip()
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                 ":(exclude)bench/results", ":(exclude)docs/benchmarks.md")
    return {
        "id": run_id or f"standalone-{script}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(started))}",
        "make_bench": bool(run_id),
        "script": script,
        "commit": git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": machine(),
    }
