"""The terminal table of runs: who they are, how they scored, and only what differs between them.

By default the table fits the terminal (``shutil.get_terminal_size``, which honours ``COLUMNS``; at
least ``MIN_WIDTH``): run, short id, DVC experiment, the headline metrics under short headers, then
the parameters that differ between the runs under their shortest unambiguous names, with a legend
of full names below. Columns that still do not fit are left out, and a line says so; a line is
never wrapped. ``wide`` shows every column under its full name; ``transpose`` puts runs in columns.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from imgpipe.errors import ParamsError
from tools.compare.runs import RunRecord, differing_parameters, final_metrics

# The headline: val and test side by side, and the baseline guard's verdict; short headers for the terminal.
HEADLINE = {"metrics/val/accuracy": "val acc", "metrics/test/accuracy": "test acc", "metrics/val/macro_f1": "val F1",
            "metrics/test/macro_f1": "test F1", "metrics/beats_baseline": "beats"}
DEFAULT_METRICS = list(HEADLINE)
IDENTITY = ("run", "id", "experiment")  # always shown first, whatever the width
WIDE_IDENTITY = ("run", "id", "created", "experiment", "tags")
MIN_WIDTH = 100
MAX_CELL = 24  # longer values (a DVC experiment's name, a list parameter) are cut with "…" in the fitted table
GAP = "  "
PARAMETERS = "parameters/"


@dataclass(frozen=True)
class Column:
    """One field of the table: ``key`` is its path in the run (``metrics/val/accuracy``) or one of
    ``WIDE_IDENTITY``; ``label`` its header; ``differing`` marks a parameter whose value is not the same
    in every run that has it."""

    key: str
    label: str
    differing: bool = False


def terminal_width() -> int:
    return max(MIN_WIDTH, shutil.get_terminal_size((MIN_WIDTH, 24)).columns)


def shown(value: Any) -> str:
    """A value as a cell: 4 significant digits, yes/no, blank when the run does not have it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return " ".join(str(value).split())  # a newline would break the row


def cell(run: RunRecord, key: str) -> str:
    identity = {"run": run.name, "id": run.run_id[:8], "created": run.created[:19], "experiment": run.experiment,
                "tags": ",".join(run.tags)}
    return identity[key] if key in identity else shown(run.values.get(key))


def select(runs: list[RunRecord], tags: Sequence[str] = (), models: Sequence[str] = (),
           experiments: Sequence[str] = ()) -> list[RunRecord]:
    """The runs of any of ``models`` (run names), of any of ``experiments`` (DVC's), holding every one of
    ``tags``. A filter that leaves no run is a ParamsError naming it and the values there are."""
    filters = [("--model", models, lambda r: r.name in models, lambda r: [r.name]),
               ("--experiment", experiments, lambda r: r.experiment in experiments, lambda r: [r.experiment]),
               ("--tag", tags, lambda r: set(tags) <= set(r.tags), lambda r: r.tags)]
    applied: list[str] = []
    for flag, wanted, keep, values in filters:
        if not wanted:
            continue
        kept = [r for r in runs if keep(r)]
        if runs and not kept:
            there = sorted({v for r in runs for v in values(r) if v})
            among = f" among the runs of {' '.join(applied)}" if applied else ""
            raise ParamsError(f"{flag} {' '.join(wanted)}: no run matches{among} (there are: "
                              f"{', '.join(there) or 'none'})")
        runs, applied = kept, [*applied, f"{flag} {' '.join(wanted)}"]
    return runs


def resolve(spec: str, keys: Iterable[str], flag: str, what: str) -> list[str]:
    """The keys ``spec`` names: a full path, or its end (``val/macro_f1``, ``resnet.learning_rate``)."""
    keys = sorted(set(keys))
    if spec in keys:
        return [spec]
    matches = [key for key in keys if key.endswith("/" + spec.replace(".", "/"))]
    if not matches:
        raise ParamsError(f"{flag} {spec}: no run has this {what} (there are: {', '.join(keys) or 'none'})")
    return matches


def sort_runs(runs: list[RunRecord], sort: str | None) -> list[RunRecord]:
    """Best first by the final metric ``sort`` (runs without it last); else oldest first."""
    runs = sorted(runs, key=lambda r: (r.created, r.run_id))
    if not sort or not runs:  # no run, nothing to check the name against (a notebook's empty selection)
        return runs
    finals = {r.run_id: final_metrics(r) for r in runs}
    matches = resolve(sort, (key for values in finals.values() for key in values), "--sort", "final metric")
    if len(matches) > 1:
        raise ParamsError(f"--sort {sort}: more than one final metric ends so ({', '.join(matches)})")
    return sorted(runs, key=lambda r: (matches[0] not in finals[r.run_id], -float(finals[r.run_id].get(matches[0], 0))))


def short_names(keys: Sequence[str], reserved: Iterable[str] = ()) -> dict[str, str]:
    """Each key's shortest ending (in path parts, joined by dots) that no other key ends with and that is
    not ``reserved``: parameters/train/resnet/epochs -> resnet.epochs beside parameters/train/automl/epochs."""
    taken = set(reserved)
    names: dict[str, str] = {}
    for key in keys:
        parts = key.split("/")
        for size in range(1, len(parts) + 1):
            ending = parts[-size:]
            if (size == len(parts) or all(other.split("/")[-size:] != ending for other in keys if other != key)) \
                    and ".".join(ending) not in taken:
                break
        names[key] = ".".join(ending)
    return names


def layout(runs: list[RunRecord], params: Sequence[str] = (), metrics: Sequence[str] | None = None,
           wide: bool = False) -> list[Column]:
    """The columns, in order: identity, metrics (``None``: the headline, or every one when ``wide``; ``["all"]``:
    every one, the headline first), parameters (empty: those that differ, or every one when ``wide``)."""
    all_metrics = sorted({key for r in runs for key in final_metrics(r)})
    all_params = sorted({key for r in runs for key in r.values if key.startswith(PARAMETERS)})
    differ = set(differing_parameters(runs))
    if metrics is None and not wide:
        metric_keys = list(DEFAULT_METRICS)
    elif metrics is None or list(metrics) == ["all"]:
        metric_keys = [*DEFAULT_METRICS, *(key for key in all_metrics if key not in HEADLINE)]
    else:
        metric_keys = [key for spec in metrics for key in resolve(spec, all_metrics, "--metrics", "final metric")]
    if params:
        param_keys = [key for spec in params for key in resolve(spec, all_params, "--params", "parameter")]
    else:
        param_keys = [key for key in all_params if wide or key in differ]
    identity = WIDE_IDENTITY if wide else IDENTITY
    fields = list(dict.fromkeys([*metric_keys, *param_keys]))  # a key asked for twice is one column
    labels = ({key: key for key in fields} if wide else
              {**short_names([k for k in fields if k not in HEADLINE], [*identity, *HEADLINE.values()]), **HEADLINE})
    return [*(Column(key, key) for key in identity),
            *(Column(key, labels[key], key in differ) for key in fields)]


def table(runs: list[RunRecord], sort: str | None = None, params: Sequence[str] = (),
          metrics: Sequence[str] | None = None, *, wide: bool = False, transpose: bool = False,
          width: int | None = None) -> str:
    """The runs as text, one row per run (``transpose``: one column per run). ``sort``: a final metric, best
    first; ``params``/``metrics``: see ``layout``; ``width``: the fitted table's (default: the terminal's),
    ignored when ``wide``."""
    runs = sort_runs(runs, sort)
    columns = layout(runs, params, metrics, wide)
    limit = None if wide else (width or terminal_width())
    return transposed(runs, columns, limit) if transpose else by_rows(runs, columns, limit)


def clip(text: str, limit: int | None) -> str:
    return text if limit is None or len(text) <= limit else text[:limit - 1] + "…"


def fitting(widths: list[int], limit: int | None, kept: int) -> int:
    """How many of the columns, left to right, fit in ``limit`` (the first ``kept`` always do)."""
    total = -len(GAP)
    for count, width in enumerate(widths):
        total += len(GAP) + width
        if limit is not None and total > limit and count >= kept:
            return count
    return len(widths)


def render(grid: list[list[str]], limit: int | None) -> list[str]:
    """Left-aligned columns of cells, the first row a header underlined with dashes."""
    widths = [max(map(len, column)) for column in zip(*grid, strict=True)]
    lines = [GAP.join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip() for row in grid]
    return [clip(line, limit) for line in [lines[0], GAP.join("-" * w for w in widths), *lines[1:]]]


def by_rows(runs: list[RunRecord], columns: list[Column], limit: int | None) -> str:
    cells = [[c.label, *(clip(cell(r, c.key), None if limit is None else MAX_CELL) for r in runs)] for c in columns]
    keep = fitting([max(map(len, column)) for column in cells], limit, len(IDENTITY))
    lines = render([list(row) for row in zip(*cells[:keep], strict=True)], limit)
    notes = []  # under a blank line: what was left out, then the legend of short names
    if keep < len(columns):
        left_out = columns[keep:]
        notes.append(clip(f"{len(left_out)} more column{'s' * (len(left_out) > 1)} left out for the width "
                          f"(--wide or --transpose shows them): {', '.join(c.label for c in left_out)}", limit))
    notes.extend(packed([f"{c.label} = {c.key}" for c in columns[:keep] if c.label != c.key], limit))
    return "\n".join([*lines, "", *notes] if notes else lines)


def packed(entries: list[str], limit: int | None) -> list[str]:
    """Legend entries side by side, as many to a line as fit."""
    lines: list[str] = []
    for entry in entries:
        if lines and (limit is None or len(lines[-1]) + 3 + len(entry) <= limit):
            lines[-1] += "   " + entry
        else:
            lines.append(entry)
    return [clip(line, limit) for line in lines]


def transposed(runs: list[RunRecord], columns: list[Column], limit: int | None) -> str:
    """A row per field under its full path, a column per run; runs that do not fit are left out and counted."""
    cells = [[c.key, *(clip(cell(r, c.key), None if limit is None else MAX_CELL) for r in runs)] for c in columns]
    keep = fitting([max(map(len, column)) for column in zip(*cells, strict=True)], limit, 2)
    lines = render([row[:keep] for row in cells], limit)
    if keep < len(runs) + 1:
        left_out = len(runs) + 1 - keep
        lines.extend(["", clip(f"{left_out} more run{'s' * (left_out > 1)} left out for the width (--wide shows them; "
                          f"--model, --experiment and --tag choose runs)", limit)])
    return "\n".join(lines)
