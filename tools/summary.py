"""Print what the last pipeline run produced, from the DVC metrics files (the end of `make demo`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

DOWNLOAD = Path("reports/download/metrics.json")
PACK = Path("reports/pack/metrics.json")
TRAINERS = {"resnet50v2": Path("reports/train_resnet"), "autokeras": Path("reports/train_automl")}
EXPORTS = Path("reports/export")
SERVE = Path("reports/serve/metrics.json")


def download_summary(path: Path = DOWNLOAD) -> str:
    report = json.loads(path.read_text())
    drops = ", ".join(f"{reason} {n}" for reason, n in report["dropped_by_reason"].items() if n) or "none"
    classes = " ".join(f"{label}:{n}" for label, n in report["kept_per_class"].items())
    return "\n".join([
        f"download: {report['total']} rows -> {report['kept']} images ({report['bytes'] / 1e6:.1f} MB) "
        f"in {report['classes']} classes",
        f"  per class: {classes}",
        f"  dropped {report['dropped']}: {drops}",
        f"  every dropped row, with its reason: {path.with_name('rejected.csv')}",
    ])


def pack_summary(path: Path = PACK) -> str:
    report = json.loads(path.read_text())
    images = report["images"]
    return (f"pack: {images['train']} train + {images['val']} val images in {report['classes']} classes, "
            f"{report['shards']['train']} + {report['shards']['val']} TFRecord shards in build/tfrecords/, "
            f"{report['skipped']} skipped")


def train_summary(model: str, folder: Path) -> str:
    report = json.loads((folder / "metrics.json").read_text())
    where = f"trial {report['best_trial']} of {report['trials_run']}, " if "best_trial" in report else ""
    return (f"{model}: val accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f} "
            f"(weighted random guess {report['baseline']['macro_f1']:.3f}); {where}epoch {report['best_epoch']}; "
            f"pictures in {folder / 'pictures'}/")


def export_summary(model: str, path: Path) -> str:
    report = json.loads(path.read_text())
    parity = report["parity"]
    maps = "class-activation maps" if report.get("class_activation_maps") else "no activation maps (flatten head)"
    return (f"export {model}: ONNX parity on {parity['images']} val images, max |keras - onnx| "
            f"{parity['max_abs_diff']:.1e}, top-1 agreement {parity['top1_agreement']:.3f}; {maps}; "
            f"build/onnx/{model}/")


def serve_summary(path: Path = SERVE) -> str:
    report = json.loads(path.read_text())
    return (f"serve: {report['model']} (version {report['version']}) answered {report['images']} val images over "
            f"HTTP, accuracy {report['http_accuracy']:.3f} = offline {report['offline_accuracy']:.3f}; "
            "build/serving/, Triton repository build/triton/")


def main() -> None:
    if not DOWNLOAD.exists():
        sys.exit(f"summary: {DOWNLOAD} not found; run `dvc repro` first")
    print(download_summary())
    if PACK.exists():
        print(pack_summary())
    for model, folder in TRAINERS.items():
        if (folder / "metrics.json").exists():
            print(train_summary(model, folder))
    if any((folder / "metrics.json").exists() for folder in TRAINERS.values()):
        print("compare: dvc metrics show | dvc plots show | python -m tools.compare")
    for model in TRAINERS:
        if (EXPORTS / model / "metrics.json").exists():
            print(export_summary(model, EXPORTS / model / "metrics.json"))
    if SERVE.exists():
        print(serve_summary())


if __name__ == "__main__":
    main()
