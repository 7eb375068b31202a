"""Export (parity check, INT8 calibration) and the serve stage's HTTP check hold a bounded number
of images, not whole splits: a stage's peak memory is the same on a small and a large record set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from imgpipe.records.read import first_images, image_batches, load_arrays
from stages import pack
from tests.conftest import small_cnn
from tests.test_pack import make_images

REPO = Path(__file__).resolve().parent.parent
SIZE = 128  # 49 KB an image as uint8, 197 KB as float32: the large set's pixels are plain to see
# Three classes. The small set already fills every bounded buffer: tf.data's few batches in
# flight (val and test hold 4 or more of the serve check's 64 images and 8 of the export's 32), the
# 128 calibration images and the 256 timed ones; so what the large set adds is what grows with data.
PER_CLASS = {"small": 300, "large": 800}
EXPORT_BATCH = 32
# What the large set may add to a stage's peak: noise. Its 1500 images more than the small set
# are 280 MB of float32 pixels (the models' input), 70 MB as uint8: a whole-split load shows.
MARGIN_MB = 60
PACK_PARAMS = f"""\
pack:
  image_size: {SIZE}
  val_fraction: 0.35
  test_fraction: 0.3
  shard_size: 100
  processes: 2
"""
ENV = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"}


def packed(root: Path, per_class: int) -> Path:
    (root / "params.yaml").write_text(PACK_PARAMS)
    make_images(root / "images", {name: per_class for name in ("cat", "dog", "owl")})
    pack.main(["--params", str(root / "params.yaml"), "--images", str(root / "images"), "--out", str(root / "tf"),
               "--report", str(root / "pack.json")])
    return root / "tf"


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return packed(tmp_path_factory.mktemp("small"), PER_CLASS["small"])


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> Path:
    return packed(tmp_path_factory.mktemp("large"), PER_CLASS["large"])


def pixel_mb(records: Path) -> float:
    """The pixels of all three splits as float32, the models' input (MB)."""
    images = json.loads((records.parent / "pack.json").read_text())["images"]
    return sum(images.values()) * SIZE * SIZE * 3 * 4 / 2**20


def peak_rss_mb(*args: str) -> float:
    """Run ``python -m <args>`` in a fresh process and return its peak resident memory (MB).

    ``wait4`` reports the usage of that one child, unlike RUSAGE_CHILDREN (the maximum over every
    child this process ever waited for)."""
    with tempfile.TemporaryFile() as log:
        child = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                 env=ENV)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        if child.returncode:
            log.seek(0)
            pytest.fail(f"python -m {' '.join(args)} failed:\n{log.read().decode()[-3000:]}")
    return usage.ru_maxrss / 1024  # Linux counts kilobytes


def test_batches_and_first_images_are_load_arrays_in_pieces(small):
    """The streamed batches are load_arrays' arrays in order, across shards; the first N images too."""
    for split in ("train", "val"):
        images, labels = load_arrays(small, split, SIZE)
        batches = list(image_batches(small, split, 64, SIZE))
        assert all(len(batch) == 64 for batch, _ in batches[:-1])
        assert np.array_equal(np.concatenate([batch for batch, _ in batches]), images)
        assert np.array_equal(np.concatenate([truth for _, truth in batches]), labels)
        assert images.dtype == batches[0][0].dtype == np.uint8
    # Train spans several shards, read interleaved: the first 150 come from more than one of them.
    images, _ = load_arrays(small, "train", SIZE)
    assert np.array_equal(first_images(small, "train", 150, SIZE), images[:150])
    assert np.array_equal(first_images(small, "train", 10_000, SIZE), images)  # fewer there: all of them


@pytest.fixture(scope="module")
def exported(small, large, tmp_path_factory) -> dict[str, tuple[float, Path]]:
    """Each set's export (with INT8, so calibration runs): (peak MB, folder of its bundle)."""
    from imgpipe.training.modelio import save_model

    root = tmp_path_factory.mktemp("exported")
    model = root / "model.keras"
    save_model(small_cnn(SIZE, 3), model)
    (root / "params.yaml").write_text(f"export:\n  quantize: true\n  batch_size: {EXPORT_BATCH}\n")
    found = {}
    for name, records in (("small", small), ("large", large)):
        bundles = root / name
        peak = peak_rss_mb("stages.export", "--params", str(root / "params.yaml"), "--model", str(model),
                           "--records", str(records), "--out", str(bundles / "resnet50v2"), "--name", "resnet50v2",
                           "--reports", str(root / "reports" / name), "--timings", str(root / f"{name}.json"))
        found[name] = peak, bundles
    return found


def check_bounded(peaks: dict[str, float], small: Path, large: Path) -> None:
    extra = pixel_mb(large) - pixel_mb(small)
    print(f"peak RSS small {peaks['small']:.0f} MB, large {peaks['large']:.0f} MB; the large set's "
          f"{extra:.0f} MB more pixels as float32")
    assert MARGIN_MB < extra / 4  # below even their uint8 size: holding them would show
    assert peaks["large"] - peaks["small"] < MARGIN_MB, peaks


@pytest.mark.slow
def test_export_peak_memory_does_not_grow_with_the_splits(exported, small, large):
    check_bounded({name: peak for name, (peak, _) in exported.items()}, small, large)
    assert (exported["large"][1] / "resnet50v2" / "model.int8.onnx").is_file()


@pytest.mark.slow
def test_serve_http_check_peak_memory_does_not_grow_with_the_splits(exported, small, large, tmp_path):
    (tmp_path / "params.yaml").write_text("serve:\n  max_batch: 32\n")
    peaks = {}
    for name, records in (("small", small), ("large", large)):
        out = tmp_path / name
        peaks[name] = peak_rss_mb("stages.serve", "--params", str(tmp_path / "params.yaml"), "--model", "resnet50v2",
                                  "--bundles", str(exported[name][1]), "--records", str(records),
                                  "--out", str(out / "serving"), "--triton", str(out / "triton"),
                                  "--reports", str(out / "reports"), "--timings", str(out / "timings.json"))
        metrics = json.loads((out / "reports" / "metrics.json").read_text())
        assert metrics["agreement_with_onnxruntime"] == 1.0
    images = json.loads((large.parent / "pack.json").read_text())["images"]
    assert metrics["images"] == {"val": images["val"], "test": images["test"]}  # every one went over HTTP
    check_bounded(peaks, small, large)
