"""What every entry point shares: its parser's common flags, logging set up once, and errors as
one line on stderr with an exit code, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from imgpipe import logs
from imgpipe.errors import ParamsError, StageError

__all__ = ["StageError", "at_least", "entry_parser", "run"]
VERBOSE_FLAGS = ("-v", "--verbose")


def entry_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every entry point takes (``--verbose``, read by ``run``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(*VERBOSE_FLAGS, action="store_true",
                        help=f"debug lines and TensorFlow's own log (or {logs.VERBOSE_ENV}=1)")
    return parser


def run(main: Callable[[], None], name: str) -> None:
    """Call an entry point's ``main`` with logging set up, turning its errors into exit codes."""
    logs.setup(verbose=any(flag in sys.argv[1:] for flag in VERBOSE_FLAGS))
    try:
        main()
    except ParamsError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except StageError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except OSError as exc:  # disk full, permissions: say which file, not where in the code
        print(f"{name}: error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)


def at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """An argparse ``type`` for numbers no smaller than ``minimum`` (``--workers 0`` is refused
    with argparse's own one-line usage error, exit code 2)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is below {minimum:g}")
        return value

    return parse
