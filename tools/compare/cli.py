"""python -m tools.compare [--sort METRIC] [--tag T] [--model NAME] [--experiment NAME] [--html PATH]

Compare Neptune runs without a Neptune server (``tools.compare.runs`` replays the offline logs).
The table fits the terminal: run, id, DVC experiment, val and test accuracy and macro-F1, whether the
model beats the weighted random guess on val, then the parameters that differ between the runs
(``--wide``: every column; ``--transpose``: a column per run). ``--html`` writes the report.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from imgpipe.cli import StageError, entry_parser
from tools.compare import report
from tools.compare.runs import RunRecord, final_metrics, find_runs
from tools.compare.table import IDENTITY, layout, select, sort_runs, table

NAME = "compare"
log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(f"python -m tools.{NAME}", "Compare Neptune runs without a Neptune server")
    parser.add_argument("--neptune-dir", type=Path, default=Path(".neptune"),
                        help="folder of Neptune's offline runs (default: %(default)s)")
    parser.add_argument("--sort", metavar="METRIC",
                        help="final metric to sort by, best first, e.g. metrics/val/macro_f1 (or val/macro_f1)")
    parser.add_argument("--params", nargs="+", default=[], metavar="PATH",
                        help="parameters to show, by path or its end, e.g. resnet.learning_rate "
                             "(default: those that differ between the runs)")
    parser.add_argument("--metrics", nargs="+", metavar="PATH",
                        help="final metrics to show, or `all` (default: val and test accuracy and macro-F1, "
                             "metrics/beats_baseline)")
    parser.add_argument("--wide", action="store_true",
                        help="every column under its full name, however wide (default: fit the terminal)")
    parser.add_argument("--transpose", action="store_true", help="a column per run, a row per field")
    parser.add_argument("--tag", action="append", default=[], help="only runs with this tag (repeat: all of them)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME",
                        help="only runs of this model: resnet50v2 or autokeras (repeat: any of them)")
    parser.add_argument("--experiment", action="append", default=[], metavar="NAME",
                        help="only runs of this DVC experiment (repeat: any of them)")
    parser.add_argument("--html", "--chart", dest="html", type=Path, metavar="PATH",
                        help="also write the report (runs, learning curves, pictures) as one HTML file")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    runs = find_runs(args.neptune_dir)  # warns about each run folder it cannot read
    if not runs:
        raise StageError(f"no Neptune runs under {args.neptune_dir}/ (train a model first)")
    runs = select(runs, args.tag, args.model, args.experiment)
    for run in runs:
        if not final_metrics(run):
            log.warning("run %s %s%s has no final metrics (stopped before the end?): its metric columns are blank",
                        run.name, run.run_id[:8], f" of experiment {run.experiment}" if run.experiment else "")
    print(table(runs, args.sort, args.params, args.metrics, wide=args.wide, transpose=args.transpose))
    if args.html:
        write_html(sort_runs(runs, args.sort), args.html, args.params, args.metrics)
        print(f"{NAME}: report of {len(runs)} runs in {args.html}")


def write_html(runs: list[RunRecord], path: Path, params: list[str], metrics: list[str] | None) -> None:
    """The report of ``runs``, in their order, with the default table's columns (none left out for the width)."""
    report.write_report(runs, path, [c.key for c in layout(runs, params, metrics) if c.key not in IDENTITY])
