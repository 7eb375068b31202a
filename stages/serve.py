"""Stage 5, the serving bundle, a Triton model repository, and the service checked over HTTP.

    python -m stages.serve --bundles build/onnx --records build/tfrecords --out build/serving \\
        --triton build/triton --reports reports/serve

Which bundle, the Triton repository and the HTTP check are ``imgpipe.serving``'s. DVC metrics:
HTTP accuracy on val and test (each must equal the bundle's offline accuracy) and agreement with
ONNX Runtime.
Latency and throughput go to ``logs/serve.json``: timings differ on every run, so they are not
DVC outputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imgpipe import params as params_module
from imgpipe.cli import entry_parser, run
from imgpipe.serving import build_serving

NAME = "serve"


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(f"python -m stages.{NAME}", __doc__.split("\n")[0])
    parser.add_argument("--bundles", type=Path, required=True, help="folder of exported bundles (one per model)")
    parser.add_argument("--records", type=Path, required=True, help="TFRecords folder (the val and test splits)")
    parser.add_argument("--out", type=Path, required=True, help="serving bundle folder to write")
    parser.add_argument("--triton", type=Path, required=True, help="Triton model repository to write")
    parser.add_argument("--reports", type=Path, default=Path("reports/serve"), help="metrics.json folder")
    parser.add_argument("--timings", type=Path, default=Path("logs/serve.json"),
                        help="untracked JSON of latency and throughput (default: %(default)s)")
    params_module.add_section_flags(parser, NAME)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    p = params_module.load_for(args).serve
    served = build_serving(args.bundles, args.records, args.out, args.triton, args.reports, args.timings, p)
    metrics, timings = served.metrics, served.timings
    images, http, offline = metrics["images"], metrics["http_accuracy"], metrics["offline_accuracy"]
    print(f"{NAME}: {metrics['model']} {metrics['version']}: {images['val']} val + {images['test']} test images "
          f"over HTTP, val accuracy {http['val']:.3f} (offline {offline['val']:.3f}), test "
          f"{http['test']:.3f} (offline {offline['test']:.3f}), agreement with ONNX Runtime "
          f"{metrics['agreement_with_onnxruntime']:.3f}; {timings['images_per_second']:.0f} images/s, "
          f"p50 {timings['p50_ms']:.0f} ms, p99 {timings['p99_ms']:.0f} ms with {timings['clients']} clients; "
          f"Triton repository {args.triton}")
    if not metrics["beats_baseline"]:  # only when serve.model names it: `best` never picks such a model
        print(f"{NAME}: WARNING: {metrics['model']} is NO BETTER THAN CHANCE on val, served only because "
              f"serve.model names it")
    served.require_agreement()  # after the summary line, which shows how far off the service is


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), NAME)
