"""python -m tools.compare: see tools/compare/cli.py."""

import sys

from imgpipe.cli import run
from tools.compare.cli import NAME, main

if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), NAME)
