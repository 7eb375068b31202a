"""Stage 3a, train ResNet50V2 on the packed TFRecords (from scratch unless train.resnet.weights).

    python -m stages.train_resnet --records build/tfrecords --out build/models/resnet50v2 \\
        --reports reports/train_resnet

The training, its outputs and its Neptune run are ``imgpipe.training.resnet``'s. Each finished
epoch is backed up in ``--workdir`` (outside DVC's outputs): killed, the same command resumes
after the last finished epoch and ends with the model an uninterrupted run would have made.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from imgpipe import params as params_module
from imgpipe.cli import run
from imgpipe.training.reports import print_summary, trainer_parser

NAME = "train_resnet"


def build_parser() -> argparse.ArgumentParser:
    parser = trainer_parser(NAME, __doc__.split("\n")[0], "train.resnet", "metrics, plots and pictures")
    parser.add_argument("--workdir", type=Path, default=Path(f".cache/{NAME}"),
                        help="backups of the last finished epoch, for a resume; not tracked (default: %(default)s)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Imported here, not above: --help and tools/reference.py build the parser without loading TensorFlow.
    from imgpipe.training.resnet import train

    params = params_module.load_for(args)
    started = time.monotonic()
    trained = train(params, args.records, args.out, args.reports, args.params, NAME, args.workdir)
    seconds = time.monotonic() - started
    print_summary(NAME, trained.scores, f"best epoch {trained.best_epoch} of {trained.epochs_run}; "
                  f"{seconds:.0f} s; model {args.out / 'model.keras'}", args.reports)


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), NAME)
