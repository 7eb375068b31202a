"""Print what the last pipeline run produced, from the DVC metrics files (the end of `make demo`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from imgpipe.training.evaluation import chance_warning

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
    images, shards = report["images"], report["shards"]
    return (f"pack: {images['train']} train + {images['val']} val + {images['test']} test images in "
            f"{report['classes']} classes, {shards['train']} + {shards['val']} + {shards['test']} TFRecord shards "
            f"in build/tfrecords/, {report['skipped']} skipped")


def chance_lines(report: dict) -> list[str]:
    """The warning, for a trainer's or export's metrics whose model fails the baseline guard."""
    if report["beats_baseline"]:
        return []
    return ["  " + chance_warning(report["macro_f1"]["val"], report["baseline_macro_f1"]["val"],
                                  report["baseline_margin"])]


def train_summary(model: str, folder: Path) -> str:
    report = json.loads((folder / "metrics.json").read_text())
    where = f"trial {report['best_trial']} of {report['trials_run']}, " if "best_trial" in report else ""
    epochs = f" of {report['epochs_run']}" if "epochs_run" in report else ""
    lines = [f"{model}: {where}best epoch {report['best_epoch']}{epochs} (chosen on val); "
             f"pictures in {folder / 'pictures'}/"]
    for split in ("val", "test"):
        lines.append(f"  {split:<4} accuracy {report['accuracy'][split]:.3f}, "
                     f"macro-F1 {report['macro_f1'][split]:.3f}; weighted random guess: accuracy "
                     f"{report['baseline_accuracy'][split]:.3f}, macro-F1 {report['baseline_macro_f1'][split]:.3f}")
    return "\n".join(lines + chance_lines(report))


def export_summary(model: str, path: Path) -> str:
    report = json.loads(path.read_text())
    parity = report["parity"]
    maps = "class-activation maps" if report.get("class_activation_maps") else "no activation maps (flatten head)"
    scores = "; ".join(f"{split} accuracy {report['accuracy'][split]:.3f}, macro-F1 {report['macro_f1'][split]:.3f}"
                       for split in ("val", "test"))
    lines = [f"export {model}: ONNX Runtime {scores}; build/onnx/{model}/",
             f"  parity on {parity['images']} val images, max |keras - onnx| {parity['max_abs_diff']:.1e}, "
             f"top-1 agreement {parity['top1_agreement']:.3f}; {maps}"]
    if "int8" in report:
        int8 = report["int8"]
        lines.append(f"  INT8: val accuracy {int8['accuracy']['val']:.3f} (change {int8['accuracy_change']:+.3f}, "
                     f"top-1 agreement with fp32 {int8['top1_agreement']:.3f}), test accuracy "
                     f"{int8['accuracy']['test']:.3f}")
    return "\n".join(lines + chance_lines(report))


def serve_summary(path: Path = SERVE) -> str:
    report = json.loads(path.read_text())
    checks = "; ".join(f"{split} {report['images'][split]} images, accuracy {report['http_accuracy'][split]:.3f} "
                       f"(offline {report['offline_accuracy'][split]:.3f})" for split in ("val", "test"))
    lines = [f"serve: {report['model']} (version {report['version']}) over HTTP: {checks}; "
             "build/serving/, Triton repository build/triton/"]
    if not report["beats_baseline"]:
        lines.append(f"  NO BETTER THAN CHANCE: the served model, {report['model']}, has a val macro-F1 not clearly "
                     "above the weighted random guess; see its trainer's line above")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """No flags: a parser all the same, for --help and the commands reference (tools/reference.py)."""
    return argparse.ArgumentParser(prog="python -m tools.summary", description=__doc__.split("\n")[0])


def main(argv: list[str] | None = None) -> None:
    build_parser().parse_args([] if argv is None else argv)  # None: called from Python, not sys.argv
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
    main(sys.argv[1:])
