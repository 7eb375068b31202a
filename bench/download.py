"""Benchmark: the download stage against img2dataset on the same 2,000 loopback URLs.

    python -m bench.download --img2dataset .venv-bench/bin/img2dataset     (or: make bench)

A separate server process adds ``--latency`` seconds to every request and serves 10% bad URLs.
Both tools use the same total concurrency and write plain files without resizing; img2dataset
gets its own best configuration (one or two processes). Throughput is whole-command wall time,
interpreter start included, so the two are measured alike. The latency-bound limit is
``workers / latency`` URLs/s: no client can beat it, and a good one should come close.
Results go to ``bench/results/download.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

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


def timed(command: list[str], **kwargs) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"bench: {' '.join(command[:3])} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return seconds


def run_ours(manifest: Path, workers: int) -> dict:
    out = WORK / "ours"
    shutil.rmtree(out, ignore_errors=True)
    log = WORK / "ours.log"
    log.unlink(missing_ok=True)
    seconds = timed([
        sys.executable, "-m", "stages.download", "--manifest", str(manifest), "--out", str(out / "images"),
        "--report", str(out / "report" / "metrics.json"), "--refresh", "--cache-dir", str(WORK / "cache"),
        "--log", str(log), "--workers", str(workers), "--min-images-per-class", "0", "--min-side", "16",
    ], cwd=ROOT)
    report = json.loads((out / "report" / "metrics.json").read_text())
    in_stage = json.loads(log.read_text().splitlines()[-1])["seconds"]
    return {"seconds": round(seconds, 3), "seconds_inside_stage": in_stage, "kept": report["kept"],
            "images_per_s": round(report["kept"] / seconds, 1),
            "urls_per_s_inside_stage": round(report["total"] / in_stage, 1)}


def run_img2dataset(binary: str, manifest: Path, workers: int, processes: int) -> dict:
    out = WORK / f"img2dataset-{processes}p"
    shutil.rmtree(out, ignore_errors=True)
    seconds = timed([
        binary, "--url_list", str(manifest), "--input_format", "csv", "--url_col", "url",
        "--output_format", "files", "--output_folder", str(out), "--resize_mode", "no", "--skip_reencode", "True",
        "--processes_count", str(processes), "--thread_count", str(workers // processes), "--timeout", "10",
        "--extract_exif", "False", "--retries", "0",
    ], env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    kept = len(list(out.rglob("*.jpg")))
    return {"processes": processes, "threads_per_process": workers // processes, "seconds": round(seconds, 3),
            "kept": kept, "images_per_s": round(kept / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--img2dataset", default=shutil.which("img2dataset"), help="img2dataset executable")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--bad-fraction", type=float, default=0.1)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--workers", type=int, default=32)
    args = parser.parse_args()
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
            writer.writerows((f"http://127.0.0.1:{port}{path}", label) for path, label in url_list(args.count, args.bad_fraction))
        ours = run_ours(manifest, args.workers)
        theirs = [run_img2dataset(args.img2dataset, manifest, args.workers, p) for p in (1, 2)]
    finally:
        server.kill()
        server.wait()

    best = max(theirs, key=lambda r: r["images_per_s"])
    limit = args.workers / args.latency
    result = {
        "benchmark": "download and validate, plain files, no resizing",
        "urls": args.count, "bad_fraction": args.bad_fraction, "latency_s": args.latency, "workers": args.workers,
        "latency_bound_limit_urls_per_s": limit,
        "ours": ours,
        "img2dataset": theirs,
        "ratio_vs_best_img2dataset": round(ours["images_per_s"] / best["images_per_s"], 2),
        "fraction_of_latency_limit": round(ours["urls_per_s_inside_stage"] / limit, 2),
        "targets": {"ratio_vs_best_img2dataset": 1.2, "fraction_of_latency_limit": 0.8},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"ours {ours['images_per_s']} images/s vs img2dataset {best['images_per_s']} "
          f"({result['ratio_vs_best_img2dataset']}x); {result['fraction_of_latency_limit']:.0%} of the "
          f"{limit:.0f} URLs/s latency-bound limit")


if __name__ == "__main__":
    main()
