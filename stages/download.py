"""Stage 1, download and validate: manifests and class folders -> image shards ``OUT/images-*.tar``.

    python -m stages.download --manifest data/manifest.csv data/local --out build/images
    RAY_ADDRESS=10.0.0.5:6379 python -m stages.download ...   # the same, on a Ray cluster

Rows are fetched concurrently and validated by decoding (``imgpipe.ingest.download``), on this
machine's cores or a Ray cluster's (``imgpipe.distribute``); every dropped row is listed with its
reason in rejected.csv beside the report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imgpipe import params as params_module
from imgpipe.cli import entry_parser, run
from imgpipe.distribute import add_engine_flags
from imgpipe.ingest.download import NAME, check_enough, download, summary_line


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(f"python -m stages.{NAME}", __doc__.split("\n")[0])
    parser.add_argument("--manifest", "--source", dest="sources", nargs="+", type=Path, required=True,
                        metavar="PATH", help="CSV manifests (url,label columns) and/or folders of class sub-folders")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder of tar shards (imgpipe/shards.py: <sha256>.<ext> + <sha256>.json)")
    parser.add_argument("--report", type=Path, default=Path("reports/download/metrics.json"),
                        help="metrics JSON; rejected.csv is written beside it (default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/download"),
                        help="validated bytes of remote URLs, reused by the next run (default: %(default)s)")
    parser.add_argument("--refresh", action="store_true", help="fetch remote URLs again even when cached")
    parser.add_argument("--log", type=Path, default=Path("logs/download.log"),
                        help="untracked log of timings, one JSON line per run (default: %(default)s)")
    add_engine_flags(parser)
    params_module.add_section_flags(parser, NAME)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    p = params_module.load_for(args, NAME).download
    result = download(args.sources, args.out, p, args.report, args.cache_dir, args.refresh, args.log,
                      args.engine, args.ray_address)
    print(summary_line(result.report, result.shards, result.seconds, result.fetched, result.engine))
    check_enough(result, p.min_images_per_class)


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), NAME)
