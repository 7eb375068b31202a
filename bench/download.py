"""Benchmark: the download stage against img2dataset on the same 2,000 loopback URLs, and the
cost of a local Ray against the stage's default process pool.

    python -m bench.download --img2dataset .venv-bench/bin/img2dataset     (or: make bench)

A separate server process adds ``--latency`` seconds to every request and serves 10% bad URLs.
Both tools use the same total concurrency, write tar shards (this stage its own, img2dataset its
``webdataset`` output) and do not resize; img2dataset gets its own best configuration (one or two
processes). This stage runs ``--processes P --fetches-per-core N`` with ``N x P`` the total.
Throughput is whole-command wall time, interpreter start included, so the two are measured
alike; each figure is the median of ``--repeat`` interleaved runs, since a shared 2-core machine
is noisy. The latency-bound limit is ``workers / latency`` URLs/s: no client can beat it, and a
good one should come close.

In the same interleaved repeats, at the largest concurrency, the stage also runs with
``--engine ray`` (a private Ray it starts on 127.0.0.1): its time over the process pool's, paired
repeat by repeat, is what a local Ray costs on one machine. Above ``RAY_COST_LIMIT`` the process
pool stays the single-machine default.

Every configuration measured is recorded (this stage's worker processes, both img2dataset
configurations at each total concurrency, the Ray runs) with the run that produced it
(``bench.provenance``). Results go to ``bench/results/download.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.provenance import record

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "download"
RESULTS = ROOT / "bench" / "results" / "download.json"
RAY_COST_LIMIT = 1.15  # a local Ray slower than the process pool by more than this: processes stay the default


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


def timed(command: list[str], watch: Callable[[int], Callable[[float], dict]] | None = None,
          **kwargs) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the command and all its processes).
    ``watch(pid)``, when given, starts watching the command and returns what stops it."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True, **kwargs)
        stop = watch(proc.pid) if watch else None
        code = proc.wait()
        seconds = time.perf_counter() - started
        if stop:
            stop(seconds)
        output.seek(0)
        text = output.read()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise SystemExit(f"bench: {' '.join(command[:3])} failed:\n{text[-4000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_ours(manifest: Path, workers: int, processes: int, engine: str = "processes") -> dict:
    """The stage at ``workers`` concurrent downloads in all: ``processes`` cores x ``workers / processes``."""
    out = WORK / f"ours-{engine}"
    shutil.rmtree(out, ignore_errors=True)
    log = out / "download.log"
    fetches = workers // processes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # --engine ray: a private local Ray
    watched: dict = {}

    def watch(pid: int) -> Callable[[float], dict]:
        from bench.scale import Watch

        watcher = Watch(pid, out / "cache", out / "images", out / "report" / "metrics.json")
        return lambda seconds: watched.update(watcher.stop(seconds))

    seconds, cpu = timed([
        sys.executable, "-m", "stages.download", "--params", str(ROOT / "params.yaml"),
        "--manifest", str(manifest), "--out", str(out / "images"),
        "--report", str(out / "report" / "metrics.json"), "--refresh", "--cache-dir", str(out / "cache"),
        "--log", str(log), "--engine", engine, "--fetches-per-core", str(fetches), "--processes", str(processes),
        "--min-images-per-class", "0", "--min-side", "16",
    ], watch, cwd=ROOT, env=env)
    report = json.loads((out / "report" / "metrics.json").read_text())
    logged = json.loads(log.read_text().splitlines()[-1])
    in_stage = logged["seconds"]
    return {"engine": engine, "processes": processes, "fetches_per_core": fetches, "seconds": round(seconds, 3),
            "seconds_inside_stage": in_stage, "kept": report["kept"], "shards": logged["shards"],
            "images_per_s": round(report["kept"] / seconds, 1),
            "urls_per_s_inside_stage": round(report["total"] / in_stage, 1),
            # The larger of RUSAGE_CHILDREN and the per-process sum sampled from /proc: the first
            # misses the pool's workers (reaped by the fork server, which the stage never waits for).
            "cpu_ms_per_url": round(max(cpu, watched["cpu_seconds_sampled"]) / report["total"] * 1000, 2),
            "cpu_ms_per_url_rusage": round(cpu / report["total"] * 1000, 2),
            "coordinator_peak_rss_mb": logged.get("coordinator_peak_rss_mb"),
            # From the files the stage creates (bench.scale.Watch): where its time went.
            "phases_s": {name: phase["seconds"] for name, phase in watched["phases"].items()}}


def tar_images(folder: Path) -> int:
    """Images (``.jpg`` members) in img2dataset's webdataset shards."""
    count = 0
    for path in folder.glob("*.tar"):
        with tarfile.open(path) as tar:
            count += sum(1 for name in tar.getnames() if name.endswith(".jpg"))
    return count


def run_img2dataset(binary: str, manifest: Path, workers: int, processes: int, count: int) -> dict:
    out = WORK / f"img2dataset-{processes}p"
    shutil.rmtree(out, ignore_errors=True)
    seconds, cpu = timed([
        binary, "--url_list", str(manifest), "--input_format", "csv", "--url_col", "url",
        "--output_format", "webdataset", "--output_folder", str(out), "--resize_mode", "no",
        "--skip_reencode", "True", "--processes_count", str(processes), "--thread_count", str(workers // processes),
        "--timeout", "10", "--extract_exif", "False", "--retries", "0",
    ], env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    kept = tar_images(out)
    return {"processes": processes, "threads_per_process": workers // processes, "seconds": round(seconds, 3),
            "kept": kept, "images_per_s": round(kept / seconds, 1), "cpu_ms_per_url": round(cpu / count * 1000, 2)}


def median_run(runs: list[dict]) -> dict:
    """The run with the median images/s (a whole run, so its figures stay consistent)."""
    ordered = sorted(runs, key=lambda r: r["images_per_s"])
    return {**ordered[len(ordered) // 2], "images_per_s_all_repeats": [r["images_per_s"] for r in runs]}


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "all_repeats": [round(v, 2) for v in values]}


def compare(binary: str, manifest: Path, workers: int, processes: int, latency: float, count: int,
            repeat: int, with_ray: bool) -> dict:
    ours_runs, ray_runs, theirs_runs = [], [], {1: [], 2: []}
    for _ in range(repeat):  # interleaved, so a noisy moment hits every configuration alike
        ours_runs.append(run_ours(manifest, workers, processes))
        if with_ray:
            ray_runs.append(run_ours(manifest, workers, processes, engine="ray"))
        for theirs_processes in theirs_runs:
            theirs_runs[theirs_processes].append(run_img2dataset(binary, manifest, workers, theirs_processes, count))
        print(f"bench.download: {workers} workers, repeat {len(ours_runs)} of {repeat}: this stage "
              f"{ours_runs[-1]['images_per_s']} images/s"
              + (f", with a local Ray {ray_runs[-1]['images_per_s']}" if with_ray else "")
              + ", img2dataset " + ", ".join(f"{p}p {runs[-1]['images_per_s']}" for p, runs in theirs_runs.items()),
              flush=True)
    ours = median_run(ours_runs)
    theirs = [median_run(runs) for runs in theirs_runs.values()]
    best = max(theirs, key=lambda r: r["images_per_s"])
    limit = workers / latency
    result = {
        "workers": workers,
        "latency_bound_limit_urls_per_s": limit,
        # What this machine's cores allow at our measured CPU cost per URL (server not counted).
        "cpu_bound_limit_urls_per_s": round((os.cpu_count() or 1) / ours["cpu_ms_per_url"] * 1000, 1),
        "ours": ours,
        "img2dataset": theirs,
        "ratio_vs_best_img2dataset": round(ours["images_per_s"] / best["images_per_s"], 2),
        "fraction_of_latency_limit": round(ours["urls_per_s_inside_stage"] / limit, 2),
    }
    if with_ray:
        result["ours_local_ray"] = median_run(ray_runs)
        result["local_ray_cost"] = local_ray_cost(ours_runs, ray_runs)
    return result


def local_ray_cost(processes: list[dict], ray: list[dict]) -> dict:
    """A local Ray's time over the process pool's, paired repeat by repeat (the runs next to each other)."""
    wall = [r["seconds"] / p["seconds"] for p, r in zip(processes, ray, strict=True)]
    inside = [r["seconds_inside_stage"] / p["seconds_inside_stage"] for p, r in zip(processes, ray, strict=True)]
    median = statistics.median(wall)
    return {
        "ray_over_processes_seconds": spread(wall),
        "ray_over_processes_seconds_inside_stage": spread(inside),
        "extra_seconds_median": round(statistics.median([r["seconds"] - p["seconds"]
                                                         for p, r in zip(processes, ray, strict=True)]), 2),
        "limit": RAY_COST_LIMIT,
        "single_machine_default": "processes" if median > RAY_COST_LIMIT else "either (Ray costs at most "
                                                                                f"{RAY_COST_LIMIT - 1:.0%})",
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
                        help="this stage's worker processes (default: one per core, %(default)s here); "
                             "--fetches-per-core is each total concurrency divided by this")
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
        uneven = [workers for workers in args.workers if workers % args.processes]
        if uneven:
            raise SystemExit(f"bench: --workers {uneven} do not divide among {args.processes} processes")
        runs = [compare(args.img2dataset, manifest, workers, args.processes, args.latency, args.count, args.repeat,
                        with_ray=workers == max(args.workers))
                for workers in args.workers]
    finally:
        server.kill()
        server.wait()

    result = {
        "benchmark": "download and validate, tar shards, no resizing",
        "output": {"ours": "tar shards (imgpipe.shards)", "img2dataset": "webdataset tar shards"},
        "urls": args.count, "bad_fraction": args.bad_fraction, "latency_s": args.latency, "repeat": args.repeat,
        "targets": {"ratio_vs_best_img2dataset": 1.2, "fraction_of_latency_limit": 0.8,
                    "local_ray_cost_limit": RAY_COST_LIMIT},
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
    for run in runs:
        if cost := run.get("local_ray_cost"):
            ratio = cost["ray_over_processes_seconds"]
            print(f"local Ray at {run['workers']} workers: {ratio['median']}x the process pool's time "
                  f"({ratio['min']}-{ratio['max']}x over {len(ratio['all_repeats'])} repeats); "
                  f"single-machine default: {cost['single_machine_default']}")
    print(f"results: {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
