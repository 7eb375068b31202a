"""Stage 3b, an AutoKeras architecture search on the packed TFRecords, its winner trained on all of train.

    python -m stages.train_automl --records build/tfrecords --out build/models/autokeras \\
        --reports reports/train_automl

The search runs on at most ``train.automl.search_images`` training images (a seeded,
class-balanced sample held in memory), then the best architecture is trained afresh on the whole
training split, streamed; the plain-Keras copy of it, the outputs (the ResNet stage's, plus
``trials.csv``) and the Neptune run are ``imgpipe.training.automl``'s. The search state (trials,
checkpoints) is backed up under ``--workdir``, outside DVC's outputs: a killed run, rerun with
the same inputs, resumes after its last finished trial; a finished run removes it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from imgpipe import params as params_module
from imgpipe.cli import run
from imgpipe.training.reports import print_summary, trainer_parser

NAME = "train_automl"


def build_parser() -> argparse.ArgumentParser:
    parser = trainer_parser(NAME, __doc__.split("\n")[0], "train.automl", "metrics, plots, pictures and trials.csv")
    parser.add_argument("--workdir", type=Path, default=Path(f".cache/{NAME}"),
                        help="backup of the search (trials, checkpoints) for a resume, not tracked; "
                             "removed when the run finishes (default: %(default)s)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Imported here, not above: --help and tools/reference.py build the parser without loading TensorFlow.
    from imgpipe.training.automl import search

    params = params_module.load_for(args)
    started = time.monotonic()
    searched = search(params, args.records, args.out, args.reports, args.workdir, args.params, NAME)
    seconds = time.monotonic() - started
    searched_on = (f"searched on {searched.search_images} of {searched.train_images} training images, "
                   f"the winner trained afresh on all" if searched.retrained
                   else f"searched on all {searched.train_images} training images")
    print_summary(NAME, searched.scores, f"best of {searched.trials_run} trials: #{searched.best_trial} "
                  f"({searched.architecture}), {searched_on}, epoch {searched.best_epoch}; {seconds:.0f} s; "
                  f"model {args.out / 'model.keras'}", args.reports)


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), NAME)
