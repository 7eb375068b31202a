"""Benchmark: does the TFRecord input pipeline keep ResNet50V2 training fed?

    python -m bench.train            (or: make bench)

The same ResNet50V2 (``imgpipe.training.models.build_resnet``, same optimizer and loss as the stage) is
trained for the same number of steps on the demo digits, fed two ways, in one run, alternating:
1. the real training input: ``imgpipe.records.read.make_dataset`` reading the packed TFRecords with
   shuffling and augmentation on, exactly as ``stages.train_resnet`` does;
2. the same images already decoded in memory as one tensor (``from_tensor_slices``), the
   fastest feed there is.
The ratio of training images/s (1 / 2) says how much the pipeline costs the trainer; the target is
at least 0.95. The first epoch of each (graph tracing, warm-up) is not counted.
Results go to ``bench/results/train.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

from bench.download import ROOT
from bench.input_pipeline import WORK, run, validated
from bench.provenance import record

RESULTS = ROOT / "bench" / "results" / "train.json"


def pack_digits(size: int):  # type: ignore[no-untyped-def]
    images = validated("digits")
    records = WORK / "train" / f"records-{size}"
    if not records.exists():
        run([sys.executable, "-m", "stages.pack", "--params", str(ROOT / "params.yaml"), "--images", str(images),
             "--out", str(records), "--report", str(WORK / "train" / "pack.json"), "--image-size", str(size)])
    return records


def train_rate(model, dataset, steps: int, epochs: int) -> float:  # type: ignore[no-untyped-def]
    """Median training images/s over the epochs after the first."""
    import keras

    class Clock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.seconds.append(time.perf_counter() - self.started)

    clock = Clock()
    model.fit(dataset, steps_per_epoch=steps, epochs=epochs, callbacks=[clock], verbose=0)
    batch = dataset.element_spec[0].shape[0] or 32
    return statistics.median(steps * batch / s for s in clock.seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=96, help="image side (default: %(default)s, the demo's)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15, help="steps per timed epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per measurement, the first not counted")
    parser.add_argument("--repeat", type=int, default=2, help="alternating measurements of each feed")
    args = parser.parse_args()
    started = time.time()

    records = pack_digits(args.size)
    import keras
    import numpy as np
    import tensorflow as tf

    from imgpipe.params import load
    from imgpipe.records.read import load_arrays, make_dataset
    from imgpipe.training.models import build_resnet, loss_for, seed_everything

    params = load(ROOT / "params.yaml")
    labels = json.loads((records / "labels.json").read_text())
    pipeline = make_dataset(records, "train", args.batch, args.size, seed=42, augment=params.augment).repeat()
    images, classes = load_arrays(records, "train", args.size)
    memory = tf.data.Dataset.from_tensor_slices((tf.constant(images.astype(np.float32)), tf.constant(classes)))
    memory = memory.shuffle(len(images), seed=42).batch(args.batch, drop_remainder=True).repeat().prefetch(2)
    one_hot = lambda x, y: (x, tf.one_hot(y, len(labels)))  # noqa: E731

    rates: dict[str, list[float]] = {"tfrecord_pipeline": [], "in_memory": []}
    for _ in range(args.repeat):
        for name, dataset in (("tfrecord_pipeline", pipeline), ("in_memory", memory)):
            seed_everything(42)
            model = build_resnet(args.size, len(labels))
            model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss_for("softmax", 0.1), metrics=["accuracy"])
            rate = train_rate(model, dataset.map(one_hot), args.steps, args.epochs)
            rates[name].append(rate)
            print(f"bench.train: {name}: {rate:.1f} training images/s", flush=True)

    pipeline_rate = statistics.median(rates["tfrecord_pipeline"])
    memory_rate = statistics.median(rates["in_memory"])
    result = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "tensorflow": tf.__version__},
        "setup": {"model": "ResNet50V2 (weights=None)", "image_size": args.size, "batch_size": args.batch,
                  "steps_per_epoch": args.steps, "timed_epochs": args.epochs - 1, "repeat": args.repeat,
                  "train_images": len(images), "augmentation": params.augment.model_dump()},
        "tfrecord_pipeline_images_per_s": round(pipeline_rate, 2),
        "in_memory_images_per_s": round(memory_rate, 2),
        "ratio": round(pipeline_rate / memory_rate, 3),
        "target_ratio": 0.95,
        "runs": {name: [round(r, 2) for r in values] for name, values in rates.items()},
        "run": record("bench.train", started),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"bench.train: pipeline {pipeline_rate:.1f} vs in-memory {memory_rate:.1f} training images/s: "
          f"ratio {result['ratio']} (target >= 0.95); {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
