"""Stage 3b, an AutoKeras architecture search on the packed TFRecords.

    python -m stages.train_automl --records build/tfrecords --out build/models/autokeras \\
        --reports reports/train_automl

The search, the plain-Keras copy of its best model, the outputs (the ResNet stage's, plus
``trials.csv``) and the Neptune run are ``imgpipe.training.automl``'s. The search state (trials,
checkpoints) lives in ``--workdir``, outside DVC's outputs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from imgpipe import params as params_module
from imgpipe.cli import run
from imgpipe.training.automl import search
from imgpipe.training.reports import print_summary, trainer_parser

NAME = "train_automl"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = trainer_parser(NAME, __doc__.split("\n")[0], "train.automl", "metrics, plots, pictures and trials.csv")
    parser.add_argument("--workdir", type=Path, default=Path(".cache/automl"),
                        help="search state: trials and checkpoints, not tracked (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = params_module.load_for(args)
    started = time.monotonic()
    searched = search(params, args.records, args.out, args.reports, args.workdir, args.params)
    seconds = time.monotonic() - started
    print_summary(NAME, searched.scores, f"best of {searched.trials_run} trials: #{searched.best_trial} "
                  f"({searched.architecture}), epoch {searched.best_epoch}; {seconds:.0f} s; "
                  f"model {args.out / 'model.keras'}", args.reports)


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), NAME)
