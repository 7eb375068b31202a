"""Stage 3a, train ResNet50V2 on the packed TFRecords (from scratch unless train.resnet.weights).

    python -m stages.train_resnet --records build/tfrecords --out build/models/resnet50v2 \\
        --reports reports/train_resnet

The training, its outputs and its Neptune run are ``imgpipe.training.resnet``'s.
"""

from __future__ import annotations

import argparse
import sys
import time

from imgpipe import params as params_module
from imgpipe.cli import run
from imgpipe.training.reports import print_summary, trainer_parser
from imgpipe.training.resnet import train

NAME = "train_resnet"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = trainer_parser(NAME, __doc__.split("\n")[0], "train.resnet", "metrics, plots and pictures")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = params_module.load_for(args)
    started = time.monotonic()
    trained = train(params, args.records, args.out, args.reports, args.params, NAME)
    seconds = time.monotonic() - started
    print_summary(NAME, trained.scores, f"best epoch {trained.best_epoch} of {trained.epochs_run}; "
                  f"{seconds:.0f} s; model {args.out / 'model.keras'}", args.reports)


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), NAME)
