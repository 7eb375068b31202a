"""Stage 4, export a trained Keras model to an ONNX serving bundle, gated on Keras-vs-ONNX parity.

    python -m stages.export --model build/models/resnet50v2/model.keras --records build/tfrecords \\
        --out build/onnx/resnet50v2 --reports reports/export/resnet50v2

The bundle, its ONNX graph and the parity gate are ``imgpipe.export``'s (``build``, ``convert``,
``graph``, ``parity``, ``quantize``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imgpipe import params as params_module
from imgpipe.cli import entry_parser, run
from imgpipe.export.build import build_bundle

NAME = "export"


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(f"python -m stages.{NAME}", __doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="trained model.keras")
    parser.add_argument("--records", type=Path, required=True, help="TFRecords folder (val and test splits, labels)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    parser.add_argument("--reports", type=Path, default=None,
                        help="folder for metrics.json (default: reports/export/NAME)")
    parser.add_argument("--timings", type=Path, default=None,
                        help="untracked JSON of speeds and seconds (default: logs/export_NAME.json)")
    parser.add_argument("--name", default=None, help="model name in the bundle (default: the model's folder name)")
    params_module.add_section_flags(parser, NAME)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = params_module.load_for(args)
    name = args.name or args.model.parent.name
    reports = args.reports or Path("reports/export") / name
    timings_path = args.timings or Path("logs") / f"export_{name}.json"
    exported = build_bundle(args.model, args.records, args.out, reports, timings_path, name, params)

    parity, metrics, timings = exported.parity, exported.metrics, exported.timings
    line = (f"{NAME}: {name}: parity on {parity.images} val images: max |keras - onnx| {parity.max_diff:.1e}, "
            f"top-1 agreement {parity.agreement:.3f}; val accuracy {metrics['accuracy']['val']:.3f}, test "
            f"{metrics['accuracy']['test']:.3f}; "
            f"{timings['onnx_images_per_second']:.0f} images/s in ONNX Runtime")
    if "int8" in metrics:
        line += (f"; INT8 {timings['int8_speedup']:.2f}x faster, accuracy change "
                 f"{metrics['int8']['accuracy_change']:+.3f}")
    print(line + f"; bundle {args.out}")


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), NAME)
