"""Benchmark: packing and reading the TFRecords, against img2dataset, Keras and the training step.

    python -m bench.input_pipeline --img2dataset .venv-bench/bin/img2dataset     (or: make bench)

On two validated image sets (generated and run through the download stage here if missing), at
224x224, in one run: photo-sized JPEGs, what users bring, and the demo's tiny digits:
1. packing images/s: ``stages.pack`` against img2dataset's ``border`` resize writing TFRecords
   (PNG at compression level 1 both, so the two do the same work; whole-command wall time,
   start-up included; the median of 3 interleaved runs each). Each reads the images as it
   takes them: ``stages.pack`` the download stage's tar shards, img2dataset a list of
   ``file://`` URLs of the same images as files;
2. reading images/s: ``imgpipe/records/read.py`` against ``keras.utils.image_dataset_from_directory``
   on the same images as class folders, augmentation off in both, second pass of each (the first warms caches),
   neither side cached; then both sides cached in memory after the first pass
   (``make_dataset(cache=True)`` against ``image_dataset_from_directory(...).cache()``), so
   cached is only ever compared with cached;
3. the training input pipeline (augmentation on) against ResNet50V2's measured training rate.
The download stage keeps images only in tar shards (``imgpipe.shards``); the class folders
that img2dataset and Keras read, ``<label>/<sha256>.<ext>`` as the stage used to write them, are
copied out of the shards once, beside them (:func:`class_folders`), outside every timing.
The setup (sizes, batch, processes, passes) and the run (``bench.provenance``) are recorded with
the figures. Results go to ``bench/results/input_pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench.download import ROOT, timed
from bench.provenance import record
from imgpipe.errors import StageError
from imgpipe.shards import iter_images, list_shards

WORK = ROOT / "bench" / "work" / "input_pipeline"
RESULTS = ROOT / "bench" / "results" / "input_pipeline.json"
SIZE = 224
BATCH = 32
PASSES = 2  # reading: the last pass is timed
TRAINING_STEPS = 4
IMG2DATASET_THREADS = 16


def run(command: list[str], **kwargs) -> float:
    """Wall seconds of a command run from the repository root."""
    return timed(command, cwd=ROOT, **kwargs)[0]


def make_photos(root: Path, count: int = 2000, classes: int = 4, seed: int = 0) -> None:
    """Photo-sized JPEGs (long side 400-640 px, like the cats-vs-dogs seed set): smooth shapes
    plus fine grain, so they cost what real photos cost to decode and resize."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        long_side = int(rng.integers(400, 641))
        short_side = int(long_side * rng.uniform(0.6, 0.9))
        width, height = (long_side, short_side) if rng.random() < 0.7 else (short_side, long_side)
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        smooth = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        smooth = np.asarray(smooth, dtype=np.int16)
        grain = rng.integers(-12, 13, size=(height, width, 3), dtype=np.int16)
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def is_shard_folder(folder: Path) -> bool:
    try:
        list_shards(folder)
    except StageError:
        return False
    return True


def validated(name: str) -> Path:
    """The download stage's output (a folder of tar shards) for the demo digits or for generated
    photo-sized images."""
    images = WORK / name / "images"
    if is_shard_folder(images):
        return images
    # Missing, or what an older checkout wrote here (class folders of loose files): this
    # benchmark's own folder, made again from the same raw images.
    shutil.rmtree(images, ignore_errors=True)
    shutil.rmtree(WORK / name / "folders", ignore_errors=True)
    raw = WORK / name / "raw"
    if not raw.exists():
        if name == "digits":
            run([sys.executable, "-m", "tools.demo_data", "--out", str(raw)])
        else:
            make_photos(raw)
    sources = [str(raw / "manifest.csv"), str(raw / "local")] if name == "digits" else [str(raw)]
    run([sys.executable, "-m", "stages.download", "--params", str(ROOT / "params.yaml"),
         "--manifest", *sources, "--out", str(images),
         "--report", str(WORK / name / "download" / "metrics.json"), "--log", str(WORK / "download.log")])
    return images


def class_folders(images: Path) -> Path:
    """The images of the shard folder ``images`` as ``<label>/<sha256>.<ext>`` files in a folder
    beside it, for the tools that read files (img2dataset's file URLs, Keras' class folders):
    the same bytes, one file per (label, image), as the download stage wrote before it wrote
    shards. Made once; kept while it holds exactly the shards' images."""
    folders = images.parent / "folders"
    stored = list(iter_images(images))  # metadata only
    wanted = {f"{image.meta.label}/{image.digest}.{image.extension}" for image in stored}
    if folders.is_dir() and {p.relative_to(folders).as_posix() for p in folders.rglob("*") if p.is_file()} == wanted:
        return folders
    shutil.rmtree(folders, ignore_errors=True)
    staging = folders.with_name(folders.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for image in stored:
        target = staging / image.meta.label / f"{image.digest}.{image.extension}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(image.read())
    staging.rename(folders)  # whole or not at all: a killed copy is never taken for a finished one
    return folders


def bench_pack(images: Path, folders: Path, img2dataset: str, repeat: int = 3) -> dict:
    """Both tools ``repeat`` times, interleaved; the median wall time of each (single runs on a
    shared 2-vCPU host varied by more than 2x). Ours packs the shard folder ``images``,
    img2dataset the same images as the files in ``folders``."""
    files = sorted(p for p in folders.rglob("*") if p.is_file())
    out = images.parent / "ours"
    urls = images.parent / "files.csv"
    urls.write_text("url\n" + "".join(f"{p.resolve().as_uri()}\n" for p in files))
    theirs_out = images.parent / "img2dataset"
    ours, theirs = [], []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        ours.append(run([sys.executable, "-m", "stages.pack", "--params", str(ROOT / "params.yaml"),
                         "--images", str(images), "--out", str(out / "records"),
                         "--report", str(out / "metrics.json"), "--image-size", str(SIZE),
                         "--processes", str(os.cpu_count() or 1)]))
        shutil.rmtree(theirs_out, ignore_errors=True)
        theirs.append(run([img2dataset, "--url_list", str(urls), "--input_format", "csv", "--url_col", "url",
                           "--output_format", "tfrecord", "--output_folder", str(theirs_out), "--resize_mode",
                           "border", "--image_size", str(SIZE), "--encode_format", "png", "--encode_quality", "1",
                           "--processes_count", str(os.cpu_count() or 1), "--thread_count", str(IMG2DATASET_THREADS),
                           "--extract_exif", "False", "--number_sample_per_shard", "1000"],
                          env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}))
    ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
    return {"images": len(files), "runs": repeat, "ours_images_per_s": round(len(files) / ours_s, 1),
            "img2dataset_images_per_s": round(len(files) / theirs_s, 1), "ratio": round(theirs_s / ours_s, 2)}


def images_per_second(dataset, passes: int = PASSES) -> float:
    rate = 0.0
    for _ in range(passes):  # keep the last pass: the first one warms the file cache and tf.function
        count, started = 0, time.perf_counter()
        for _, labels in dataset:
            count += int(labels.shape[0])
        rate = count / (time.perf_counter() - started)
    return rate


def bench_read(images: Path, folders: Path) -> dict:
    import keras

    from imgpipe.params import AugmentParams
    from imgpipe.records.read import make_dataset

    records = images.parent / "ours" / "records"
    ours = images_per_second(make_dataset(records, "train", BATCH, SIZE, seed=1, augment=None))
    cached = images_per_second(make_dataset(records, "train", BATCH, SIZE, seed=1, augment=None, cache=True))
    keras_ds = keras.utils.image_dataset_from_directory(folders, image_size=(SIZE, SIZE), batch_size=BATCH,
                                                       shuffle=True, seed=1, verbose=False)
    theirs = images_per_second(keras_ds)
    theirs_cached = images_per_second(keras_ds.cache())
    augmented = images_per_second(make_dataset(records, "train", BATCH, SIZE, seed=1, augment=AugmentParams()))
    return {"ours_images_per_s": round(ours, 1), "image_dataset_from_directory_images_per_s": round(theirs, 1),
            "ratio": round(ours / theirs, 2), "ours_cached_images_per_s": round(cached, 1),
            "image_dataset_from_directory_cached_images_per_s": round(theirs_cached, 1),
            "ratio_both_cached": round(cached / theirs_cached, 2),
            "ours_with_augmentation_images_per_s": round(augmented, 1)}


def bench_training_step(classes: int, steps: int = TRAINING_STEPS) -> float:
    import keras
    import numpy as np

    model = keras.applications.ResNet50V2(weights=None, input_shape=(SIZE, SIZE, 3), classes=classes)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(BATCH, SIZE, SIZE, 3)).astype("float32")
    y = rng.integers(0, classes, size=(BATCH,))
    model.train_on_batch(x, y)  # build and trace outside the timing
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return BATCH * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--img2dataset", default=shutil.which("img2dataset"), help="img2dataset executable")
    args = parser.parse_args()
    started = time.time()
    if not args.img2dataset:
        raise SystemExit("bench: img2dataset not found; `make bench` installs it into .venv-bench")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    WORK.mkdir(parents=True, exist_ok=True)
    sets = {}
    for name in ("photos", "digits"):
        images = validated(name)
        folders = class_folders(images)
        sets[name] = {"pack": bench_pack(images, folders, args.img2dataset), "read": bench_read(images, folders)}
    training = bench_training_step(4)
    photos = sets["photos"]
    result = {
        "benchmark": "pack and read 224x224 TFRecords; ResNet50V2 training rate",
        "sets": {"photos": "2000 generated photo-sized JPEGs (400-640 px), 4 classes",
                 "digits": "the 1797 demo digits (36-216 px PNG/JPEG), 10 classes"},
        **sets,
        "setup": {"image_size": SIZE, "batch_size": BATCH, "pack_processes": os.cpu_count() or 1,
                  "img2dataset_processes": os.cpu_count() or 1, "img2dataset_threads_per_process": IMG2DATASET_THREADS,
                  "read_passes": PASSES, "timed_read_pass": PASSES, "training_steps": TRAINING_STEPS,
                  "training_classes": 4, "training_input": "random 224x224 tensors (train_on_batch)",
                  "inputs": {"stages.pack": "the download stage's tar shards (imgpipe.shards)",
                             "img2dataset": "file:// URLs of the same images, <label>/<sha256>.<ext> files",
                             "image_dataset_from_directory": "the same files, in class folders"}},
        "training": {"resnet50v2_images_per_s": round(training, 2), "batch_size": BATCH,
                     "input_over_training": round(photos["read"]["ours_with_augmentation_images_per_s"] / training, 1)},
        "targets": {"pack_ratio": 1.0, "read_ratio": 2.0, "input_over_training": 10.0},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "run": record("bench.input_pipeline", started),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for name, figures in sets.items():
        packing, reading = figures["pack"], figures["read"]
        print(f"{name}: pack {packing['ours_images_per_s']} images/s vs img2dataset "
              f"{packing['img2dataset_images_per_s']} ({packing['ratio']}x); read {reading['ours_images_per_s']} "
              f"images/s vs image_dataset_from_directory {reading['image_dataset_from_directory_images_per_s']} "
              f"({reading['ratio']}x); both cached {reading['ours_cached_images_per_s']} vs "
              f"{reading['image_dataset_from_directory_cached_images_per_s']} ({reading['ratio_both_cached']}x)")
    print(f"input pipeline with augmentation {photos['read']['ours_with_augmentation_images_per_s']} images/s vs "
          f"ResNet50V2 training {training:.1f} images/s ({result['training']['input_over_training']}x)")
    print(f"results: {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
