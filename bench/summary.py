"""One table of every benchmark's headline figure against its target, from bench/results/*.json.

    python -m bench.summary                 print the Markdown table
    python -m bench.summary --write README.md   replace the table between README's bench-summary markers

``make bench`` ends with ``--write README.md``, and a test checks README's table against the
results files, so the figures in the README are always the measured ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
START, END = "<!-- bench-summary:start -->", "<!-- bench-summary:end -->"


def machine(result: dict) -> str:
    info = result.get("machine", {})
    cpu = info.get("processor") or info.get("platform", "").split("-with-")[0] or "?"
    return f"{info.get('cpus', '?')} CPUs, {cpu}"


def row(bench: str, compared: str, value: float, target: float, result: dict, unit: str = "x") -> list[str]:
    shown = f"{value:.0%}" if unit == "%" else f"{value:.2f}{unit}"
    wanted = f"{target:.0%}" if unit == "%" else f"{target:g}{unit}"
    return [bench, compared, shown, f">= {wanted}", "yes" if value >= target else "**no**", machine(result)]


def rows(results: Path = RESULTS) -> list[list[str]]:
    def load(name: str) -> dict | None:
        path = results / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    out: list[list[str]] = []
    if download := load("download"):
        targets = download["targets"]
        default = max(download["runs"], key=lambda run: run["workers"])
        least = min(download["runs"], key=lambda run: run["workers"])
        out.append(row("download", f"images/s against img2dataset's best configuration, {default['workers']} workers",
                       default["ratio_vs_best_img2dataset"], targets["ratio_vs_best_img2dataset"], download))
        out.append(row("download", f"share of the latency-bound limit, {least['workers']} workers",
                       least["fraction_of_latency_limit"], targets["fraction_of_latency_limit"], download, "%"))
    if pipeline := load("input_pipeline"):
        targets = pipeline["targets"]
        for key in ("photos", "digits"):
            name = pipeline["sets"][key].split(",")[0]
            out.append(row("pack", f"images/s against img2dataset to TFRecord, {name}",
                           pipeline[key]["pack"]["ratio"], targets["pack_ratio"], pipeline))
            for cached in ("", "_cached"):
                out.append(row("read", f"{'cached' if cached else 'uncached'} TFRecords against "
                                       f"`image_dataset_from_directory`, {name}",
                               pipeline[key]["read"][f"ratio{cached}"], targets["read_ratio"], pipeline))
        out.append(row("read", "augmented training input against ResNet50V2's training rate",
                       pipeline["training"]["input_over_training"], targets["input_over_training"], pipeline))
    if train := load("train"):
        out.append(row("train", "training images/s from TFRecords against in-memory tensors",
                       train["ratio"], train["target_ratio"], train))
    if serve := load("serve"):
        for precision, ratios in serve["ratios"].items():
            targets = serve["targets"][precision]
            for key, compared in (("service_c32_vs_raw_onnxruntime", "service images/s at concurrency 32 against "
                                                                     "raw ONNX Runtime at its best batch"),
                                  ("service_c32_vs_keras_c32", "service images/s against per-request Keras (fp32), "
                                                               "concurrency 32"),
                                  ("keras_p50_c1_vs_service_p50_c1", "single-image p50 latency, Keras (fp32) over "
                                                                     "service")):
                out.append(row("serve", f"{precision}: {compared}", ratios[key], targets[key]["target"], serve))
    return out


def table(results: Path = RESULTS) -> str:
    header = ["benchmark", "compared", "measured", "target", "met", "machine"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows(results)]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    start, end = text.index(START), text.index(END)
    return text[:start] + START + "\n" + block + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.summary", description=__doc__.split("\n")[0])
    parser.add_argument("--write", type=Path, metavar="MARKDOWN", help="replace the table in this file")
    args = parser.parse_args(argv)
    block = table()
    if not args.write:
        print(block)
        return 0
    try:
        text = args.write.read_text()
    except OSError as exc:
        print(f"{args.write}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if START not in text or END not in text:
        print(f"{args.write}: no {START} ... {END} markers to replace", file=sys.stderr)
        return 1
    args.write.write_text(replace_block(text, block))
    print(f"bench.summary: table written to {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
