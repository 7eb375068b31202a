"""Benchmark: does the TFRecord input keep ResNet50V2 training fed at each size and precision; what does a kill cost?

    python -m bench.train            (or: make bench)

1. Feed. The demo digits are packed at each size (``--sizes``, default 128 and 224 px) and, for
   each size and precision (``--precisions``: Keras' global policy through
   ``imgpipe.training.models.set_precision``), one ResNet50V2 is built as the stage builds it
   (``build_resnet`` with the stage's head, dropout and batch-norm momentum, its optimizer, loss,
   metric and class weights, seeded, op determinism as params.yaml says) and trained with
   ``fit`` fed two ways, alternating (a b, b a, a b, ...; ``--repeat`` of each):
   a. the stage's real training input: ``imgpipe.records.read.training_epochs`` (the packed
      TFRecords read, shuffled, PNG-decoded and augmented as params.yaml's ``augment:`` says);
   b. the same training images already decoded in memory as one uint8 tensor
      (``from_tensor_slices``, shuffled, batched, cast and prefetched as (a) is): the fastest feed
      there is, no augmentation.
   Each run is one ``fit`` of ``--warmup`` steps (not timed: graph tracing on the first run,
   the pipeline's start on every run) then ``--steps`` timed steps; images/s per run. Reported per
   size and precision: each feed's median (and the spread of its runs), the ratio of the medians
   (a / b, target at least 0.95 in every configuration, the worst one included) and the spread of
   the per-repeat ratios (a run over the run of b next to it, which shares its machine's load).
   The model's weights carry on from run to run (a training step costs the same whatever they
   are), so each size and precision is built and traced once.
   mixed_float16 on a machine without a GPU is emulated (CPUs have no float16 arithmetic; the
   stage warns): one TFRecord-fed run of ``--float16-steps`` steps after one warm-up step per
   size, shown so the precision table is complete, not compared.
2. Kill and resume: ``python -m stages.train_resnet`` on the smallest size's records
   (``--resume-epochs`` epochs, batch 32, one pass an epoch, no early stop, everything else from
   params.yaml) run once uninterrupted, then once killed with SIGKILL as it prints the last
   ``Epoch N/`` line (every earlier epoch backed up) and run again to the end. Time lost: killed +
   resumed - uninterrupted wall time (whole commands). The resumed ``model.keras`` must be
   bit-identical to the uninterrupted one (the benchmark fails if not); the backup's size is read
   right after the kill.
Results go to ``bench/results/train.json`` (``--results``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.download import ROOT
from bench.input_pipeline import WORK, run, validated
from bench.provenance import cpu_model, record

RESULTS = ROOT / "bench" / "results" / "train.json"
TRAIN = WORK / "train"
TARGET_RATIO = 0.95
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
RESUME_BATCH = 32


def pack_digits(size: int) -> Path:
    images = validated("digits")
    records = TRAIN / f"records-{size}"
    if not records.exists():
        run([sys.executable, "-m", "stages.pack", "--params", str(ROOT / "params.yaml"), "--images", str(images),
             "--out", str(records), "--report", str(TRAIN / f"pack-{size}.json"), "--image-size", str(size)])
    return records


def bf16_instructions() -> list[str]:
    """The CPU's bfloat16 instruction sets (AVX-512 BF16, AMX), as /proc/cpuinfo lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(flag for flag in line.split(":", 1)[1].split() if "bf16" in flag)
    except OSError:
        pass
    return []


def timed_fit(model, dataset, warmup: int, steps: int, batch: int,  # type: ignore[no-untyped-def]
              class_weight) -> tuple[float, float]:
    """Training images/s over ``steps`` steps after ``warmup`` untimed ones, in one ``fit``, and the
    seconds from the fit's start to the end of the warm-up (tracing, the pipeline's start)."""
    import keras

    class Clock(keras.callbacks.Callback):  # a batch-end callback: Keras calls it in step, not async
        def __init__(self) -> None:
            super().__init__()
            self.ends: list[float] = []

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.ends.append(time.perf_counter())

    clock = Clock()
    started = time.perf_counter()
    model.fit(dataset, steps_per_epoch=warmup + steps, epochs=1, class_weight=class_weight, callbacks=[clock],
              verbose=0)
    if len(clock.ends) != warmup + steps:
        raise SystemExit(f"bench.train: fit ran {len(clock.ends)} steps, not {warmup + steps}: the data ran out")
    return steps * batch / (clock.ends[-1] - clock.ends[warmup - 1]), clock.ends[warmup - 1] - started


def measure(records: Path, size: int, precisions: list[str], args: argparse.Namespace, params) -> list[dict]:  # type: ignore[no-untyped-def]
    """Every precision at one size: images/s of each feed, interleaved."""
    import tensorflow as tf

    from imgpipe.records.read import AUTOTUNE, label_counts, load_arrays, to_float, training_epochs
    from imgpipe.training.models import (
        build_resnet,
        class_weights,
        loss_for,
        resolve_head,
        seed_everything,
        set_precision,
        targets_for,
    )
    from imgpipe.training.resnet import optimizer_for

    common, p = params.train, params.train.resnet
    seed_everything(p.seed, common.deterministic)  # as the stage: op determinism before its datasets
    labels = json.loads((records / "labels.json").read_text())
    head = resolve_head(common.head, len(labels))
    to_targets = targets_for(head, len(labels))
    counts = label_counts(records, "train", len(labels))
    steps_per_pass = -(-sum(counts) // args.batch)
    weights = class_weights(counts) if p.class_weighting else None
    # (a) the stage's own training input, one epoch of it (each fit starts it afresh)
    pipeline = training_epochs(records, args.batch, size, p.seed, 0, 1, 1,
                               params.augment if p.augment else None).map(to_targets)
    # (b) the same pixels decoded once, kept as uint8 like the pipeline's batches before the cast
    images, classes = load_arrays(records, "train", size)
    memory = (tf.data.Dataset.from_tensor_slices((tf.constant(images), tf.constant(classes)))
              .shuffle(len(images), seed=p.seed, reshuffle_each_iteration=True).repeat()
              .batch(args.batch, num_parallel_calls=AUTOTUNE, deterministic=True)
              .map(to_float, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE).map(to_targets))
    del images
    feeds = {"tfrecord": pipeline, "in_memory": memory}

    out = []
    for precision in precisions:
        seed_everything(p.seed, common.deterministic)
        warning = set_precision(precision)  # after seed_everything, whose clear_session resets it
        model = build_resnet(size, len(labels), head, p.dropout, p.batchnorm_momentum)
        model.compile(optimizer=optimizer_for(p, p.epochs * steps_per_pass, p.warmup_epochs * steps_per_pass),
                      loss=loss_for(head, p.label_smoothing), metrics=["accuracy"])
        emulated = warning is not None
        if emulated:
            print(f"bench.train: {size} px {precision}: {warning}", flush=True)
        warmup, steps = (1, args.float16_steps) if emulated else (args.warmup, args.steps)
        order = ["tfrecord"] if emulated else ["tfrecord", "in_memory"]
        runs: dict[str, list[float]] = {name: [] for name in order}
        for repeat in range(1 if emulated else args.repeat):
            for name in order if repeat % 2 == 0 else order[::-1]:
                rate, warming = timed_fit(model, feeds[name], warmup, steps, args.batch, weights)
                runs[name].append(round(rate, 2))
                print(f"bench.train: {size} px {precision} {name} run {repeat + 1}: {rate:.2f} training images/s "
                      f"({warmup} warm-up steps: {warming:.1f} s)", flush=True)
        config = {"image_size": size, "precision": precision, "emulated": emulated, "warning": warning,
                  "warmup_steps": warmup, "steps": steps, "runs": runs,
                  "tfrecord_images_per_s": round(statistics.median(runs["tfrecord"]), 2)}
        if not emulated:
            memory_rate = statistics.median(runs["in_memory"])
            per_repeat = [a / b for a, b in zip(runs["tfrecord"], runs["in_memory"], strict=True)]
            config.update(in_memory_images_per_s=round(memory_rate, 2),
                          ratio=round(statistics.median(runs["tfrecord"]) / memory_rate, 3),
                          ratio_runs=[round(r, 3) for r in per_repeat])
        out.append(config)
        del model
    set_precision("float32")
    return out


# --- kill and resume --------------------------------------------------------------------------


def watch(command: list[str], cwd: Path, env: dict, log: Path, kill_at: str | None = None) -> dict:
    """Run a command, its output (stdout and stderr) to ``log`` with each line's time; with
    ``kill_at``, SIGKILL it as it prints a line starting so. Wall seconds to the end or the kill."""
    cwd.mkdir(parents=True, exist_ok=True)
    lines: list[tuple[float, str]] = []
    killed = None
    started = time.perf_counter()
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process, log.open("w") as out:
        assert process.stdout is not None
        for line in process.stdout:
            now = time.perf_counter() - started
            out.write(line)
            lines.append((now, line.rstrip("\n")))
            if kill_at and line.startswith(kill_at):
                process.send_signal(signal.SIGKILL)  # the stage's python process itself: no shell between
                killed = now
                break
        code = process.wait(timeout=120 if killed is not None else None)
    if kill_at and killed is None:
        raise SystemExit(f"bench.train: {command[2]} never printed {kill_at!r} (exit code {code}); see {log}")
    if not kill_at and code != 0:
        raise SystemExit(f"bench.train: {command[2]} failed (exit code {code}); see {log}")
    return {"seconds": round(killed if killed is not None else time.perf_counter() - started, 1), "lines": lines}


def epoch_starts(lines: list[tuple[float, str]]) -> list[float]:
    """When each ``Epoch N/M`` line came, in seconds from the command's start."""
    return [when for when, line in lines if line.startswith("Epoch ")]


def epoch_seconds(lines: list[tuple[float, str]]) -> list[float]:
    """Each epoch's wall time: from its ``Epoch N/M`` line to the ``steps/steps - ...`` line Keras
    (verbose=2) prints once the epoch, its validation and its backup are done."""
    out, begun = [], None
    for when, line in lines:
        if line.startswith("Epoch "):
            begun = when
        elif begun is not None and re.match(r"\d+/\d+ - ", line):
            out.append(round(when - begun, 1))
            begun = None
    return out


def disk_bytes(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kill_and_resume(records: Path, size: int, epochs: int) -> dict:
    from imgpipe.params import load

    folder = TRAIN / "resume"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    params = folder / "params.yaml"  # one copy for all three runs: an edit meanwhile cannot split them
    shutil.copyfile(ROOT / "params.yaml", params)
    flags = ["--epochs", str(epochs), "--min-steps", "0", "--patience", "0", "--batch-size", str(RESUME_BATCH)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NEPTUNE_MODE": "debug", "PYTHONUNBUFFERED": "1"}

    def command(name: str) -> list[str]:
        return [sys.executable, "-m", "stages.train_resnet", "--params", str(params), "--records", str(records),
                "--out", str(folder / name / "model"), "--reports", str(folder / name / "reports"),
                "--workdir", str(folder / name / "cache"), *flags]

    kill_at = f"Epoch {epochs}/"  # printed once every earlier epoch is backed up
    print(f"bench.train: kill and resume at {size} px: uninterrupted run", flush=True)
    whole = watch(command("whole"), folder / "whole", env, folder / "whole.log")
    print(f"bench.train: killed run (SIGKILL at {kill_at!r})", flush=True)
    killed = watch(command("killed"), folder / "killed", env, folder / "killed.log", kill_at)
    cache = folder / "killed" / "cache"
    backup_bytes, backup_files = disk_bytes(cache)
    states = list(cache.glob("*/state.json"))
    backed_up = json.loads(states[0].read_text())["epoch"] if states else 0
    if backed_up != epochs - 1:
        raise SystemExit(f"bench.train: the killed run backed up epoch {backed_up}, not {epochs - 1}; see {cache}")
    print("bench.train: resumed run", flush=True)
    resumed = watch(command("killed"), folder / "killed", env, folder / "resumed.log")
    text = "\n".join(line for _, line in resumed["lines"])
    if f"resuming after epoch {epochs - 1} of {epochs}" not in text or "Epoch 1/" in text:
        raise SystemExit(f"bench.train: the second run did not resume after epoch {epochs - 1} (did the code, "
                         f"params or records change in between?); see {folder / 'resumed.log'}")
    identical = {name: sha256(folder / "whole" / sub / name) == sha256(folder / "killed" / sub / name)
                 for sub, name in (("model", "model.keras"), ("reports", "history.csv"),
                                   ("reports", "metrics.json"))}
    starts = epoch_starts(whole["lines"])
    lost = killed["seconds"] + resumed["seconds"] - whole["seconds"]
    result = {
        "image_size": size, "epochs": epochs, "batch_size": RESUME_BATCH, "flags": flags, "kill_at": kill_at,
        "precision": load(params).train.precision,
        "uninterrupted_s": whole["seconds"], "killed_s": killed["seconds"], "resumed_s": resumed["seconds"],
        "lost_s": round(lost, 1), "lost_fraction": round(lost / whole["seconds"], 3),
        "uninterrupted_first_epoch_at_s": round(starts[0], 1),
        "resumed_first_epoch_at_s": round(epoch_starts(resumed["lines"])[0], 1),
        "epoch_s": epoch_seconds(whole["lines"]), "resumed_epoch_s": epoch_seconds(resumed["lines"]),
        "backup_bytes": backup_bytes, "backup_files": backup_files, "backed_up_epoch": backed_up,
        "model_sha256": sha256(folder / "whole" / "model" / "model.keras"),
        "bit_identical": identical["model.keras"], "identical": identical,
    }
    for name in ("whole", "killed"):  # two ResNet50V2 models; the logs and reports stay
        shutil.rmtree(folder / name / "model", ignore_errors=True)
    return result


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224], help="image sides (default: %(default)s)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS,
                        help="Keras dtype policies (default: all three)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default: %(default)s, the stage's)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run "
                                                              "(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of each feed (default: %(default)s)")
    parser.add_argument("--float16-steps", type=int, default=2,
                        help="timed steps of the one run of an emulated mixed_float16 (default: %(default)s)")
    parser.add_argument("--resume-epochs", type=int, default=2,
                        help="epochs of the kill-and-resume runs, killed before the last (default: %(default)s)")
    parser.add_argument("--skip-resume", action="store_true", help="measure the feeds only")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="results file (default: bench/results/train.json)")
    args = parser.parse_args(argv)
    if min(args.warmup, args.steps, args.repeat, args.float16_steps, args.batch) < 1 or args.resume_epochs < 2:
        parser.error("--warmup, --steps, --repeat, --float16-steps and --batch must be at least 1, "
                     "--resume-epochs at least 2")
    started = time.time()

    sizes = sorted(set(args.sizes))
    records = {size: pack_digits(size) for size in sizes}
    import keras
    import tensorflow as tf

    from imgpipe.params import load
    from imgpipe.records.read import label_counts

    params = load(ROOT / "params.yaml")
    labels = json.loads((records[sizes[0]] / "labels.json").read_text())
    train_images = sum(label_counts(records[sizes[0]], "train", len(labels)))
    if args.warmup + args.steps > train_images // args.batch:
        parser.error(f"--warmup + --steps must fit in one pass of full batches ({train_images // args.batch})")
    precisions = [precision for precision in PRECISIONS if precision in args.precisions]

    configs = [config for size in sizes for config in measure(records[size], size, precisions, args, params)]
    resume = None if args.skip_resume else kill_and_resume(records[sizes[0]], sizes[0], args.resume_epochs)

    compared = [config for config in configs if "ratio" in config]
    result = {
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "processor": platform.processor() or platform.machine(),
                    "bf16_instructions": bf16_instructions(), "gpus": len(tf.config.list_logical_devices("GPU")),
                    "python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__},
        "setup": {"model": "ResNet50V2 (weights=None), the stage's head, optimizer, loss and class weights",
                  "train_images": train_images, "classes": len(labels), "batch_size": args.batch,
                  "warmup_steps": args.warmup, "steps": args.steps, "repeat": args.repeat,
                  "float16_steps": args.float16_steps, "deterministic": params.train.deterministic,
                  "augmentation": params.augment.model_dump() if params.train.resnet.augment else None,
                  "tfrecord": "imgpipe.records.read.training_epochs (read, shuffle, decode, augment)",
                  "in_memory": "from_tensor_slices of the decoded uint8 images, shuffled, batched, cast, prefetched; "
                               "no augmentation"},
        "target_ratio": TARGET_RATIO,
        "configs": configs,
        "worst": (min(({"image_size": c["image_size"], "precision": c["precision"], "ratio": c["ratio"]}
                       for c in compared), key=lambda c: c["ratio"]) if compared else None),
        "resume": resume,
        "run": record("bench.train", started),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    for config in configs:
        memory = (f" vs in memory {config['in_memory_images_per_s']:g}: ratio {config['ratio']:g} "
                  f"(per repeat {min(config['ratio_runs']):g}-{max(config['ratio_runs']):g})"
                  if "ratio" in config else " (emulated, TFRecord only)")
        print(f"bench.train: {config['image_size']} px {config['precision']}: TFRecord "
              f"{config['tfrecord_images_per_s']:g}{memory} training images/s")
    if resume:
        print(f"bench.train: kill and resume: {resume['killed_s']:g} s + {resume['resumed_s']:g} s against "
              f"{resume['uninterrupted_s']:g} s uninterrupted: {resume['lost_s']:g} s lost; backup "
              f"{resume['backup_bytes'] / 2**20:.0f} MB; bit-identical: {resume['bit_identical']}")
    print(f"bench.train: results in {args.results}")
    if resume and not resume["bit_identical"]:
        raise SystemExit("bench.train: FAILED: the resumed model.keras is not bit-identical to the uninterrupted "
                         f"run's (see {TRAIN / 'resume'})")


if __name__ == "__main__":
    main()
