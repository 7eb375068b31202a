"""Shared entry-point wrapper: errors become one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from imgpipe.params import ParamsError


class StageError(Exception):
    """A stage cannot finish; the message says what and where, in one line."""


def run(main: Callable[[], None], name: str) -> None:
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
