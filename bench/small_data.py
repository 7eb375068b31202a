"""Benchmark: does ResNet50V2 from scratch learn anything on a small photo-like set at 224 px?

    python -m bench.small_data                 (before and after, ~15 min on 2 CPU cores)
    python -m bench.small_data --only after    (one configuration)
    python -m bench.small_data --demo          (the demo digits at 64 px instead; ~10 min per configuration)

Why: a user's ~200 photos in 2 classes (issue 13) trained to the majority class with the old
defaults, val loss exploding (0.59 -> 5.6 -> 11.9) while train accuracy rose. With ~5 steps per
epoch, Keras' BatchNormalization momentum 0.99 leaves the moving statistics that inference uses
close to their initial values (0.99^50 = 0.6 of the initial mean 0 / variance 1 after 10 epochs),
so the model evaluated in inference mode is not the one that was trained. The demo (1,400 images,
44 steps per epoch) hides this.

What: nothing can be downloaded, so the set is built from real handwritten digits shipped with
scikit-learn (``load_digits``): two classes (0 and 1 by default, ``--digits``), 120 and 80 images
(the user's 60/40 imbalance), each written as a photo would be: 300-1200 px sides, varied aspect
ratios, tinted paper with an uneven light, the digit at a random place, size and tilt, blur,
sensor noise, JPEG, into class folders (``photos/<digit>/<digit>_NNN.jpg``) as a user's photos
would be. The files are byte-identical for a fixed seed. Then the real stages run through their
command lines with the repository's ``params.yaml`` (224 px; not ``data/params.yaml``, the demo's
overlay), as a user runs them: ``stages.download`` on the class folders once (validated images in
tar shards, ``images/``), ``stages.pack`` on those once, ``stages.train_resnet`` once per
configuration, "before" (the old defaults written out) and "after" (the new ones). ``--demo``
packs ``build/images``, the demo's download output (``make demo``). Everything is written under
``--work`` (default /tmp/smallset); the summary goes to ``bench/results/small_data.json``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from bench import provenance
from imgpipe.errors import StageError
from imgpipe.shards import list_shards

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "small_data.json"
WORK = Path("/tmp/smallset")
DEMO_IMAGES = ROOT / "build" / "images"

SEED = 13
# digit -> images: ~200 in all, 60/40 like the user's set. Two shapes as distinct as a user's two
# kinds of photo (AutoKeras told theirs apart at 0.977); --digits 3 8 is a much harder pair.
CLASSES = {"0": 120, "1": 80}

# train.resnet keys only, written out in full so the comparison does not depend on params.yaml.
BEFORE = {"optimizer": "adam", "learning_rate": 0.001, "schedule": "cosine", "batch_size": 32,
          "label_smoothing": 0.1, "class_weighting": True, "augment": True, "dropout": 0.0}
BEFORE_NEW_KEYS = {"batchnorm_momentum": 0.99, "warmup_epochs": 0, "weight_decay": 0.0, "min_steps": 0}
AFTER = {**BEFORE, "batch_size": 16, "batchnorm_momentum": 0.9, "warmup_epochs": 1, "weight_decay": 0.0,
         "min_steps": 250}
CONFIGS = {"before": BEFORE, "after": AFTER}


# --- the data set -------------------------------------------------------------------------


def digits_of(digit: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` different 8x8 images of ``digit`` (values 0-16), drawn without replacement."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pool = data.images[data.target == digit]
    return [pool[i] for i in rng.choice(len(pool), size=count, replace=False)]


def lighting(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """An uneven light across the sheet: a linear gradient in a random direction, 0.75-1.0."""
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xs / width) * np.cos(angle) + (ys / height) * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    return 1.0 - rng.uniform(0.0, 0.25) * ramp


def render(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One photo of a handwritten digit on paper; RGB, 300-1200 px sides."""
    short = int(rng.integers(300, 801))
    long_side = min(1200, int(short * rng.uniform(1.0, 1.6)))
    width, height = (long_side, short) if rng.random() < 0.5 else (short, long_side)
    side = int(short * rng.uniform(0.6, 0.95))  # a photo of a digit: it fills most of the frame
    padded = np.pad(digit, 2)  # a blank margin: the ink fades out instead of ending at the 8x8 edge
    ink = Image.fromarray((padded * (255 / 16)).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
    ink = ink.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR, expand=True)
    sheet = Image.new("L", (width, height), 0)
    x = int(rng.integers(0, max(1, width - ink.width + 1)))
    y = int(rng.integers(0, max(1, height - ink.height + 1)))
    sheet.paste(ink, (x, y))
    gray = np.asarray(sheet, dtype=np.float32)[..., None] / 255
    paper = rng.uniform(170, 255, size=3).astype(np.float32)
    ink_rgb = rng.uniform(0, 100, size=3).astype(np.float32)
    rgb = (paper * (1 - gray) + ink_rgb * gray) * lighting(width, height, rng)[..., None]
    rgb += rng.normal(0, rng.uniform(2, 10), size=rgb.shape).astype(np.float32)  # sensor noise
    image = Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8), "RGB")
    return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))


def jpeg(image: Image.Image, rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(70, 96)))
    return buffer.getvalue()


def write_set(out: Path, seed: int = SEED, classes: dict[str, int] = CLASSES) -> int:
    """Write ``out/<label>/<label>_NNN.jpg``, class folders as a user brings them (the download
    stage's input, not pack's); the bytes depend only on ``seed`` (and the pinned NumPy, Pillow
    and scikit-learn). Returns the number of images."""
    rng = np.random.default_rng(seed)
    total = 0
    for label, count in classes.items():
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        for i, digit in enumerate(digits_of(int(label), count, rng)):
            (folder / f"{label}_{i:03d}.jpg").write_bytes(jpeg(render(digit, rng), rng))
            total += 1
    return total


# --- the pipeline -------------------------------------------------------------------------


def run_stage(args: list[str], log: Path) -> None:
    """``python -m stages.…`` from the repository root; its output goes to ``log``, and to the
    console's error stream if it fails."""
    env = {**os.environ, "NEPTUNE_MODE": os.environ.get("NEPTUNE_MODE", "offline")}
    with log.open("w") as sink:
        done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"{args[0]} failed (exit code {done.returncode}); log: {log}")


def shard_problem(images: Path) -> str | None:
    """Why ``images`` is not a complete download output (a folder of tar shards), or None."""
    try:
        list_shards(images)
    except StageError as exc:
        return str(exc)
    return None


def download_set(photos: Path, images: Path, work: Path, params: list[Path]) -> dict[str, Any]:
    """Run the download stage on the class folders ``photos`` into the shard folder ``images``
    (kept when it is already a complete one); returns the stage's report."""
    report = work / "download" / "metrics.json"
    if shard_problem(images) is None and report.exists():
        return json.loads(report.read_text())
    if images.exists() and all(entry.is_dir() for entry in images.iterdir()):
        # Class folders that an older version of this script wrote here (pack now takes shards
        # only, and the download stage will not write over them): made again from ``photos``.
        print(f"small_data: replacing {images} (class folders of an older run) with the download stage's shards",
              flush=True)
        shutil.rmtree(images)
    run_stage(["stages.download", "--params", *map(str, params), "--manifest", str(photos), "--out", str(images),
               "--report", str(report), "--cache-dir", str(work / "download" / "cache"),
               "--log", str(work / "download" / "timings.log")], work / "download.log")
    return json.loads(report.read_text())


def supported_keys() -> set[str]:
    """``train.resnet`` keys this checkout knows (the new ones land in imgpipe/params.py)."""
    from imgpipe.params import ResnetParams

    return set(ResnetParams.model_fields)


def flags(config: dict[str, Any]) -> list[str]:
    """``--train.resnet`` flags for ``config``; keys the checkout does not have yet are left out."""
    known, out = supported_keys(), []
    for key, value in config.items():
        if key not in known:
            continue
        name = "--" + key.replace("_", "-")
        out += [name if value else "--no-" + key.replace("_", "-")] if isinstance(value, bool) else [name, str(value)]
    return out


def split_metrics(metrics: dict[str, Any], split: str) -> dict[str, Any] | None:
    """One split's numbers from metrics.json, whichever layout the checkout writes: val alone at the
    top level (``{"accuracy": 0.9, "baseline": {...}}``), split-major (``{"val": {...}, "test": {...}}``)
    or metric-major (``{"accuracy": {"val": ..., "test": ...}, "baseline_macro_f1": {...}}``)."""
    if isinstance(metrics.get(split), dict):
        part = metrics[split]
        return {"accuracy": part["accuracy"], "macro_f1": part["macro_f1"],
                "baseline_macro_f1": part.get("baseline", {}).get("macro_f1")}
    if isinstance(metrics.get("accuracy"), dict):
        if split not in metrics["accuracy"]:
            return None
        baseline = metrics.get("baseline_macro_f1", {})
        return {"accuracy": metrics["accuracy"][split], "macro_f1": metrics["macro_f1"][split],
                "baseline_macro_f1": baseline.get(split) if isinstance(baseline, dict) else None}
    if split == "val" and "accuracy" in metrics:
        return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                "baseline_macro_f1": metrics.get("baseline", {}).get("macro_f1")}
    return None


def read_history(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def train(name: str, config: dict[str, Any], records: Path, work: Path, params: list[Path],
          reuse: bool = False) -> dict[str, Any]:
    """Run the train stage with ``config`` (or, with ``reuse``, read the reports of an earlier run)
    and summarise its metrics.json and history.csv."""
    out, reports = work / "models" / name, work / "reports" / name
    used = flags(config)
    clock = work / f"seconds-{name}.txt"
    if not (reuse and (reports / "metrics.json").exists() and clock.exists()):
        started = time.monotonic()
        run_stage(["stages.train_resnet", "--records", str(records), "--out", str(out), "--reports", str(reports),
                   "--params", *map(str, params), *used], work / f"train-{name}.log")
        clock.write_text(f"{time.monotonic() - started:.1f}\n")
    metrics = json.loads((reports / "metrics.json").read_text())
    history = read_history(reports / "history.csv")
    known = supported_keys()
    return {
        "params": {k: v for k, v in config.items() if k in known},
        "params_not_in_checkout": sorted(k for k in config if k not in known),
        "flags": used,
        "val": split_metrics(metrics, "val"),
        "test": split_metrics(metrics, "test"),
        "beats_baseline": metrics.get("beats_baseline"),
        "best_epoch": metrics.get("best_epoch"),
        "epochs_run": metrics.get("epochs_run", len(history)),
        "val_loss": [row.get("val_loss") for row in history],
        "val_accuracy": [row.get("val_accuracy") for row in history],
        "train_accuracy": [row.get("accuracy") for row in history],
        "seconds": float(clock.read_text()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.small_data", description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=WORK, help="images, records, models, logs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED, help="data set seed (default: %(default)s)")
    parser.add_argument("--digits", nargs=2, default=list(CLASSES), metavar="DIGIT",
                        help="the two digits, 120 and 80 images (default: %(default)s)")
    parser.add_argument("--only", choices=sorted(CONFIGS), nargs="+", default=sorted(CONFIGS, reverse=True))
    parser.add_argument("--epochs", type=int, default=10, help="train.resnet.epochs (default: %(default)s)")
    parser.add_argument("--demo", action="store_true",
                        help="the demo digits (build/images from `make demo`, 10 classes) at 64 px, no flips, 8 epochs")
    parser.add_argument("--data-only", action="store_true",
                        help="write the photos, run the download stage on them (to tar shards) and stop; "
                             "with --demo, check build/images and stop")
    parser.add_argument("--reuse", action="store_true",
                        help="summarise a configuration's earlier reports under --work instead of training again")
    parser.add_argument("--results", type=Path, default=RESULTS, help="summary JSON (default: %(default)s)")
    args = parser.parse_args()

    work = args.work / ("demo" if args.demo else "small")
    work.mkdir(parents=True, exist_ok=True)
    params = [ROOT / "params.yaml"]
    if args.demo:
        images, epochs = DEMO_IMAGES, 8
        if problem := shard_problem(images):
            raise SystemExit(f"small_data: {problem}; `make demo` writes the demo's download output there")
        overlay = work / "demo-params.yaml"  # what data/params.yaml sets for the digits' pixels
        overlay.write_text("pack:\n  image_size: 64\naugment:\n  flip: false\n")
        params.append(overlay)
    else:
        photos, images, epochs = work / "photos", work / "images", args.epochs
        if not photos.exists():
            classes = dict(zip(args.digits, CLASSES.values(), strict=True))
            staging = work / "photos.partial"  # renamed when whole: a killed run never leaves half a set
            shutil.rmtree(staging, ignore_errors=True)
            count = write_set(staging, args.seed, classes)
            staging.rename(photos)
            print(f"small_data: {count} photos in {photos}", flush=True)
        report = download_set(photos, images, work, params)
        print(f"small_data: download stage kept {report['kept']} of {report['total']} "
              f"({', '.join(f'{label}: {n}' for label, n in sorted(report['kept_per_class'].items()))}) "
              f"in {images}", flush=True)
    if args.data_only:
        return
    records = work / "records"
    if not (records / "labels.json").exists():
        run_stage(["stages.pack", "--params", *map(str, params), "--images", str(images), "--out", str(records),
                   "--report", str(work / "pack.json")], work / "pack.log")

    results: dict[str, Any] = json.loads(args.results.read_text()) if args.results.exists() else {}
    started = time.time()
    key = "demo" if args.demo else "small"
    section = results.setdefault(key, {"images": str(images), "configs": {}})
    if not args.demo:
        section["digits"] = args.digits
    section["epochs"] = epochs
    section["pack"] = json.loads((work / "pack.json").read_text()).get("images")
    for name in args.only:
        config = {**CONFIGS[name], "epochs": epochs, **({} if name != "before" else BEFORE_NEW_KEYS)}
        print(f"small_data: training {name} ({key})", flush=True)
        row = train(name, config, records, work, params, args.reuse)
        section["configs"][name] = row
        section["run"] = provenance.record("small_data", started)
        val = row["val"]
        print(f"small_data: {name}: val accuracy {val['accuracy']:.3f}, macro-F1 {val['macro_f1']:.3f} "
              f"(weighted random {val['baseline_macro_f1']:.3f}), "
              f"best epoch {row['best_epoch']} of {row['epochs_run']}, "
              f"val loss {row['val_loss']}, {row['seconds']:.0f} s", flush=True)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
