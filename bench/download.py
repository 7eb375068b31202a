"""Benchmark: the download stage against img2dataset on the same 2,000 loopback URLs.

    python -m bench.download --img2dataset .venv-bench/bin/img2dataset     (or: make bench)

A separate server process adds ``--latency`` seconds to every request and serves 10% bad URLs.
Both tools use the same total concurrency and write plain files without resizing; img2dataset
gets its own best configuration (one or two processes). Throughput is whole-command wall time,
interpreter start included, so the two are measured alike; each figure is the median of
``--repeat`` interleaved runs, since a shared 2-core machine is noisy. The latency-bound limit is
``workers / latency`` URLs/s: no client can beat it, and a good one should come close.
Every configuration measured is recorded (this stage's worker processes, both img2dataset
configurations at each total concurrency) with the run that produced it (``bench.provenance``).
Results go to ``bench/results/download.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.provenance import record

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "download"
RESULTS = ROOT / "bench" / "results" / "download.json"


def start_server(count: int, bad_fraction: float, latency: float) -> tuple[subprocess.Popen, int]:
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.latency_server", "--count", str(count), "--bad-fraction", str(bad_fraction),
         "--latency", str(latency)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    line = server.stdout.readline()
    if not line.startswith("PORT "):
        server.kill()
        raise SystemExit(f"bench: latency server did not start ({line!r})")
    return server, int(line.split()[1])


def timed(command: list[str], **kwargs) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the command and all its processes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"bench: {' '.join(command[:3])} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_ours(manifest: Path, workers: int, processes: int) -> dict:
    out = WORK / "ours"
    shutil.rmtree(out, ignore_errors=True)
    log = WORK / "ours.log"
    log.unlink(missing_ok=True)
    seconds, cpu = timed([
        sys.executable, "-m", "stages.download", "--params", str(ROOT / "params.yaml"),
        "--manifest", str(manifest), "--out", str(out / "images"),
        "--report", str(out / "report" / "metrics.json"), "--refresh", "--cache-dir", str(WORK / "cache"),
        "--log", str(log), "--workers", str(workers), "--processes", str(processes),
        "--min-images-per-class", "0", "--min-side", "16",
    ], cwd=ROOT)
    report = json.loads((out / "report" / "metrics.json").read_text())
    in_stage = json.loads(log.read_text().splitlines()[-1])["seconds"]
    return {"processes": processes, "threads_per_process": workers // processes, "seconds": round(seconds, 3),
            "seconds_inside_stage": in_stage, "kept": report["kept"],
            "images_per_s": round(report["kept"] / seconds, 1),
            "urls_per_s_inside_stage": round(report["total"] / in_stage, 1),
            "cpu_ms_per_url": round(cpu / report["total"] * 1000, 2)}


def run_img2dataset(binary: str, manifest: Path, workers: int, processes: int, count: int) -> dict:
    out = WORK / f"img2dataset-{processes}p"
    shutil.rmtree(out, ignore_errors=True)
    seconds, cpu = timed([
        binary, "--url_list", str(manifest), "--input_format", "csv", "--url_col", "url",
        "--output_format", "files", "--output_folder", str(out), "--resize_mode", "no", "--skip_reencode", "True",
        "--processes_count", str(processes), "--thread_count", str(workers // processes), "--timeout", "10",
        "--extract_exif", "False", "--retries", "0",
    ], env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    kept = len(list(out.rglob("*.jpg")))
    return {"processes": processes, "threads_per_process": workers // processes, "seconds": round(seconds, 3),
            "kept": kept, "images_per_s": round(kept / seconds, 1), "cpu_ms_per_url": round(cpu / count * 1000, 2)}


def median_run(runs: list[dict]) -> dict:
    """The run with the median images/s (a whole run, so its figures stay consistent)."""
    ordered = sorted(runs, key=lambda r: r["images_per_s"])
    return {**ordered[len(ordered) // 2], "images_per_s_all_repeats": [r["images_per_s"] for r in runs]}


def compare(binary: str, manifest: Path, workers: int, processes: int, latency: float, count: int,
            repeat: int) -> dict:
    ours_runs, theirs_runs = [], {1: [], 2: []}
    for _ in range(repeat):  # interleaved, so a noisy moment hits both tools alike
        ours_runs.append(run_ours(manifest, workers, processes))
        for theirs_processes in theirs_runs:
            theirs_runs[theirs_processes].append(run_img2dataset(binary, manifest, workers, theirs_processes, count))
    ours = median_run(ours_runs)
    theirs = [median_run(runs) for runs in theirs_runs.values()]
    best = max(theirs, key=lambda r: r["images_per_s"])
    limit = workers / latency
    return {
        "workers": workers,
        "latency_bound_limit_urls_per_s": limit,
        # What this machine's cores allow at our measured CPU cost per URL (server not counted).
        "cpu_bound_limit_urls_per_s": round((os.cpu_count() or 1) / ours["cpu_ms_per_url"] * 1000, 1),
        "ours": ours,
        "img2dataset": theirs,
        "ratio_vs_best_img2dataset": round(ours["images_per_s"] / best["images_per_s"], 2),
        "fraction_of_latency_limit": round(ours["urls_per_s_inside_stage"] / limit, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--img2dataset", default=shutil.which("img2dataset"), help="img2dataset executable")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--bad-fraction", type=float, default=0.1)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 16, 32],
                        help="total concurrency, the same for both tools (default: %(default)s)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="this stage's worker processes (default: one per core, %(default)s here)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool and setting; the median is kept")
    args = parser.parse_args()
    started = time.time()
    if not args.img2dataset:
        raise SystemExit("bench: img2dataset not found; `make bench` installs it into .venv-bench")

    from bench.latency_server import url_list

    WORK.mkdir(parents=True, exist_ok=True)
    server, port = start_server(args.count, args.bad_fraction, args.latency)
    try:
        manifest = WORK / "urls.csv"
        with manifest.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["url", "label"])
            writer.writerows((f"http://127.0.0.1:{port}{path}", label)
                             for path, label in url_list(args.count, args.bad_fraction))
        runs = [compare(args.img2dataset, manifest, workers, args.processes, args.latency, args.count, args.repeat)
                for workers in args.workers]
    finally:
        server.kill()
        server.wait()

    result = {
        "benchmark": "download and validate, plain files, no resizing",
        "urls": args.count, "bad_fraction": args.bad_fraction, "latency_s": args.latency, "repeat": args.repeat,
        "targets": {"ratio_vs_best_img2dataset": 1.2, "fraction_of_latency_limit": 0.8},
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "run": record("bench.download", started),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'workers':>7} {'limit/s':>8} {'cpu limit/s':>11} {'ours img/s':>10} {'i2d img/s':>9} {'ratio':>6} "
          f"{'of limit':>8}")
    for run in runs:
        best = max(r["images_per_s"] for r in run["img2dataset"])
        print(f"{run['workers']:>7} {run['latency_bound_limit_urls_per_s']:>8.0f} "
              f"{run['cpu_bound_limit_urls_per_s']:>11.0f} {run['ours']['images_per_s']:>10} "
              f"{best:>9} {run['ratio_vs_best_img2dataset']:>5}x {run['fraction_of_latency_limit']:>8.0%}")
    print(f"results: {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
