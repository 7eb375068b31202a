"""Stage 2, pack: the download stage's image shards -> letterboxed, sharded TFRecords with a fixed split.

    python -m stages.pack --images build/images --out build/tfrecords [--engine ray] [--ray-address ADDR]

The split, the pixels and the record format are ``imgpipe.records.write``'s; where the
letterboxing runs (this machine's processes, or Ray) is ``imgpipe.distribute``'s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from imgpipe import params as params_module
from imgpipe.cli import entry_parser, run
from imgpipe.distribute import add_engine_flags, describe, distributor
from imgpipe.params import PackParams
from imgpipe.records.write import PRELOAD, index_images, pack, write_report

NAME = "pack"


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(f"python -m stages.{NAME}", __doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, required=True,
                        help="the download stage's folder of images-NNNNN-of-NNNNN.tar shards")
    parser.add_argument("--out", type=Path, required=True, help="folder for TFRecord shards and labels.json")
    parser.add_argument("--report", type=Path, default=Path("reports/pack/metrics.json"),
                        help="metrics JSON; skipped.csv is written beside it (default: %(default)s)")
    add_engine_flags(parser)
    params_module.add_section_flags(parser, NAME)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    p: PackParams = params_module.load_for(args, NAME).pack
    started = time.monotonic()
    images = index_images(args.images)  # before any engine starts: a wrong folder fails in a second
    with distributor(args.engine, args.ray_address, p.processes, PRELOAD) as engine:
        report, skipped = pack(images, args.out, p, engine)
    write_report(args.report, report, skipped)

    seconds = time.monotonic() - started
    images_by_split = report["images"]
    total = sum(images_by_split.values())
    print(f"{NAME}: {total} images ({images_by_split['train']} train, {images_by_split['val']} val, "
          f"{images_by_split['test']} test) in {report['classes']} classes at {p.image_size}x{p.image_size}, "
          f"{len(skipped)} skipped; {describe(engine)}, {seconds:.1f} s, {total / seconds:.0f} images/s")


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), NAME)
