"""The two errors an entry point turns into one line on stderr and an exit code (``imgpipe.cli.run``)."""


class StageError(Exception):
    """A stage cannot finish; the message says what and where, in one line (exit code 1)."""


class ParamsError(Exception):
    """A parameter is missing, unknown or of the wrong type; the message names file and key (exit code 2)."""
