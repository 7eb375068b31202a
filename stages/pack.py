"""Stage 2, pack: class folders of images -> letterboxed, sharded TFRecords with a fixed split.

    python -m stages.pack --images build/images --out build/tfrecords

The split, the pixels and the record format are ``imgpipe.records.write``'s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from imgpipe import params as params_module
from imgpipe.cli import entry_parser, run
from imgpipe.params import PackParams
from imgpipe.records.write import pack, write_report

NAME = "pack"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = entry_parser(f"python -m stages.{NAME}", __doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of <label>/<image> files")
    parser.add_argument("--out", type=Path, required=True, help="folder for TFRecord shards and labels.json")
    parser.add_argument("--report", type=Path, default=Path("reports/pack/metrics.json"),
                        help="metrics JSON; skipped.csv is written beside it (default: %(default)s)")
    params_module.add_section_flags(parser, NAME)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    p: PackParams = params_module.load_for(args, NAME).pack
    started = time.monotonic()
    report, skipped = pack(args.images, args.out, p)
    write_report(args.report, report, skipped)

    seconds = time.monotonic() - started
    images = report["images"]
    total = sum(images.values())
    print(f"{NAME}: {total} images ({images['train']} train, {images['val']} val, {images['test']} test) in "
          f"{report['classes']} classes at {p.image_size}x{p.image_size}, {len(skipped)} skipped; "
          f"{seconds:.1f} s, {total / seconds:.0f} images/s")


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), NAME)
