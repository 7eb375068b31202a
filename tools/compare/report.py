"""The HTML report of runs: one self-contained page (``python -m tools.compare --html PATH``).

Everything is in the one file, so it opens offline and can be mailed or archived: inline CSS, a
few lines of inline JavaScript (the table sorts on a click), the charts as inline SVG drawn here,
the pictures as data: URIs. It names no other host and holds no time of its own: the same runs
give the same bytes.

Sections: the runs table (the terminal table's columns, differing parameters highlighted); one
chart per series with every run's curve overlaid (an AutoKeras run's best trial drawn as its
curve, its other trials faded in the same colour); each run's pictures side by side.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from itertools import groupby
from pathlib import Path

from imgpipe.cli import StageError
from imgpipe.files import write_text_atomic
from tools.compare.runs import Points, RunRecord, Upload, differing_parameters
from tools.compare.table import DEFAULT_METRICS, shown

# Okabe-Ito's colours, told apart with the common colour blindnesses (its yellow is left out:
# unreadable on white); past seven runs the colours come round again, dashed.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
DASHES = ("", "7 4", "2 3")
IMAGE_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "gif": "image/gif",
               "webp": "image/webp", "svg": "image/svg+xml"}
GROUPS = {"metrics": "Final metrics", "parameters": "Parameters"}  # table header groups, by the key's first part
X_LABELS = {"train": "epoch", "trials": "trial"}  # a chart's x axis, by the series' first part; else "step"

# The charts' drawing area, in SVG user units (the SVG scales to its box's width).
WIDTH, HEIGHT = 560, 300
LEFT, RIGHT, TOP, BOTTOM = 58, 14, 12, 40
MARKED = 12  # a run's curve of at most this many points (a few epochs, a search's trials) shows each point


@dataclass(frozen=True)
class Style:
    color: str
    dash: str


def style_of(index: int) -> Style:
    return Style(PALETTE[index % len(PALETTE)], DASHES[index // len(PALETTE) % len(DASHES)])


def label(run: RunRecord) -> str:
    """How a run is named everywhere in the report: name, DVC experiment (if any), short id."""
    return " · ".join(part for part in (run.name, run.experiment, run.run_id[:8]) if part)


def write_report(runs: list[RunRecord], path: Path, columns: Sequence[str] | None = None) -> None:
    """Write the report of ``runs`` (in this order) to ``path``. ``columns``: the table's field paths
    after run, id and experiment (default: the headline metrics, then the differing parameters)."""
    if path.suffix.lower() not in (".html", ".htm"):
        raise StageError(f"{path}: the report is one HTML page; give a path ending in .html")
    if not runs:
        raise StageError("no runs to report")
    columns = list(columns) if columns is not None else [*DEFAULT_METRICS, *differing_parameters(runs)]
    styles = {run.run_id: style_of(index) for index, run in enumerate(runs)}
    write_text_atomic(path, page(runs, columns, styles))  # a reader never sees half a report


def chart(runs: list[RunRecord], path: Path, table_text: str = "") -> None:
    """The old name of :func:`write_report` (``table_text`` is not needed: the report has its own table)."""
    write_report(runs, path)


def page(runs: list[RunRecord], columns: list[str], styles: dict[str, Style]) -> str:
    created = sorted(run.created[:10] for run in runs if run.created)
    span = f", recorded {created[0]} to {created[-1]}" if created else ""
    charts = chart_keys(runs)
    return "\n".join([
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Neptune runs ({len(runs)})</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Neptune runs</h1><p class=muted>{len(runs)} run{'s' if len(runs) != 1 else ''}{escape(span)}. "
        "<a href=#runs>Runs</a> · <a href=#curves>Learning curves</a> · <a href=#pictures>Pictures</a></p>",
        '<section id=runs><h2>Runs</h2>', runs_table(runs, columns, styles), "</section>",
        '<section id=curves><h2>Learning curves</h2>',
        ("<div class=charts>" + "".join(series_chart(key, runs, styles) for key in charts) + "</div>"
         if charts else "<p>The runs hold no series (per-epoch values).</p>"),
        "</section>",
        '<section id=pictures><h2>Pictures</h2>', *(run_pictures(run, runs, styles) for run in runs), "</section>",
        f"<script>{SCRIPT}</script>",
        "</body></html>",
        "",
    ])


def cell_value(run: RunRecord, key: str) -> object:
    if key in run.values:
        return run.values[key]
    if key in run.sets:
        return ",".join(sorted(run.sets[key]))
    return None


def header_name(key: str) -> str:
    """The key without its group (shown above it), breakable after each slash."""
    group, _, rest = key.partition("/")
    return "/<wbr>".join(escape(part) for part in (rest if group in GROUPS and rest else key).split("/"))


def runs_table(runs: list[RunRecord], columns: list[str], styles: dict[str, Style]) -> str:
    differing = set(differing_parameters(runs))
    numeric = {key for key in columns
               if all(isinstance(v, int | float) for r in runs if (v := cell_value(r, key)) is not None)}
    groups = "".join(
        f'<th colspan={len(list(keys))} class=group scope=colgroup>{escape(GROUPS.get(group, ""))}</th>'
        for group, keys in groupby(columns, key=lambda k: k.split("/")[0]))
    heads = [("run", "run", "text", ""), ("id", "id", "text", ""), ("experiment", "experiment", "text", "")]
    heads += [(key, header_name(key), "number" if key in numeric else "text", " differs" * (key in differing))
              for key in columns]
    head_row = "".join(
        f'<th scope=col data-column={index} data-type={kind} class="{kind}{extra}" title="{escape(key)}">'
        f"<button type=button>{name}</button></th>"
        for index, (key, name, kind, extra) in enumerate(heads))
    rows = []
    for run in runs:
        color = styles[run.run_id].color
        cells = [
            f'<th scope=row data-value="{escape(run.name)}"><a href="#run-{run.run_id[:8]}">'
            f'<span class=swatch style="background:{color}"></span>{escape(run.name)}</a></th>',
            f'<td data-value="{run.run_id[:8]}" title="{escape(run.run_id)}"><code>{run.run_id[:8]}</code></td>',
            f'<td data-value="{escape(run.experiment)}">{escape(run.experiment)}</td>',
        ]
        for key in columns:
            value = cell_value(run, key)
            sort_value = "" if value is None else repr(float(value)) if key in numeric else str(value)
            classes = ("number" if key in numeric else "text") + " differs" * (key in differing)
            cells.append(f'<td class="{classes}" data-value="{escape(sort_value)}">'
                         f"{escape(shown(value))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = ("<p class=muted><span class=differs>Highlighted</span>: parameters whose values differ between "
            "these runs.</p>" if differing & set(columns) else "")
    return ("<div class=table-box tabindex=0 role=region aria-label=Runs><table class=runs>"
            "<caption>Click a column's name to sort by it; click again to reverse.</caption>"
            f"<thead><tr><th colspan=3 class=group scope=colgroup></th>{groups}</tr><tr>{head_row}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>{note}")


def chart_keys(runs: list[RunRecord]) -> list[str]:
    """Every series any run has, a metric next to its val_ twin: accuracy, val_accuracy, loss, ..."""
    keys = {key for run in runs for key, points in run.curves.items() if xy(points)}

    def order(key: str) -> tuple[str, str, bool]:
        family, _, name = key.rpartition("/")
        return family, name.removeprefix("val_"), name.startswith("val_")

    return sorted(keys, key=order)


def xy(points: Points) -> list[tuple[float, float]]:
    """A series' points, at their step (or their place, for points logged without one); a diverged
    training's NaN or infinite loss is no point to draw."""
    return [(float(step if step is not None else index), float(value)) for index, (step, value) in enumerate(points)
            if math.isfinite(value)]


def ticks(low: float, high: float, whole: bool) -> tuple[float, float, list[float]]:
    """About five round ticks covering [low, high], and the range they span; whole numbers only if ``whole``."""
    if high <= low:
        pad = 1.0 if whole else (abs(low) * 0.05 or 0.5)
        low, high = low - pad, high + pad
    raw = (high - low) / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if whole:
        step = max(1.0, round(step))
    first, last = math.floor(low / step + 1e-9) * step, math.ceil(high / step - 1e-9) * step
    count = round((last - first) / step)
    return first, last, [round(first + i * step, 10) for i in range(count + 1)]


def number(value: float) -> str:
    return f"{value:.1f}"


def series_chart(key: str, runs: list[RunRecord], styles: dict[str, Style]) -> str:
    """One metric: each run's curve, an AutoKeras run's other trials faded beneath, and a legend."""
    curves: list[tuple[RunRecord, list[tuple[float, float]]]] = []
    faded: list[tuple[RunRecord, int, list[tuple[float, float]]]] = []
    notes: dict[str, str] = {}
    for run in runs:
        if points := xy(run.curves.get(key, [])):
            curves.append((run, points))
        best = run.best_trial
        if best is not None and key not in run.series and key in run.curves:  # the curve is the best trial's
            others = [(n, points) for n in run.trials if n != best and (points := xy(run.trial_series(n).get(key, [])))]
            faded += [(run, n, points) for n, points in others]
            notes[run.run_id] = (f"best of {len(run.trials)} trials (trial {best}, lowest val_loss)"
                                 + ("; the others faded" if others else ""))
    everything = [point for _, line in curves for point in line] + [point for _, _, line in faded for point in line]
    xs, ys = [x for x, _ in everything], [y for _, y in everything]
    x0, x1, x_ticks = ticks(min(xs), max(xs), whole=all(x.is_integer() for x in xs))
    y0, y1, y_ticks = ticks(min(ys), max(ys), whole=False)

    def at(x: float, y: float) -> str:
        return (f"{number(LEFT + (x - x0) / (x1 - x0) * (WIDTH - LEFT - RIGHT))},"
                f"{number(HEIGHT - BOTTOM - (y - y0) / (y1 - y0) * (HEIGHT - TOP - BOTTOM))}")

    def line(run: RunRecord, points: list[tuple[float, float]], css: str, trial: str) -> str:
        style = styles[run.run_id]
        dash = f' stroke-dasharray="{style.dash}"' if style.dash else ""
        data = f'data-run="{run.run_id}" data-trial="{trial}"'
        if len(points) == 1:
            cx, cy = at(*points[0]).split(",")
            return f'<circle class="{css}" {data} cx="{cx}" cy="{cy}" r="3.5" fill="{style.color}"/>'
        polyline = (f'<polyline class="{css}" {data} stroke="{style.color}"{dash} '
                    f'points="{" ".join(at(x, y) for x, y in points)}"><title>{escape(label(run))}</title></polyline>')
        if css == "trial" or len(points) > MARKED:
            return polyline
        marks = "".join(f'<circle cx="{cx}" cy="{cy}" r="3"/>' for cx, cy in (at(x, y).split(",") for x, y in points))
        return f'{polyline}<g class=points fill="{style.color}">{marks}</g>'

    grid = [f'<line class=grid x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y}" y2="{y}"/>'
            f'<text x="{LEFT - 6}" y="{y}" text-anchor=end dominant-baseline=middle>{value:g}</text>'
            for value in y_ticks for y in [at(x0, value).split(",")[1]]]
    grid += [f'<line class=grid x1="{x}" x2="{x}" y1="{TOP}" y2="{HEIGHT - BOTTOM}"/>'
             f'<text x="{x}" y="{HEIGHT - BOTTOM + 16}" text-anchor=middle>{value:g}</text>'
             for value in x_ticks for x in [at(value, y0).split(",")[0]]]
    x_label = X_LABELS.get(key.split("/")[0], "step")
    svg = (f'<svg class=chart viewBox="0 0 {WIDTH} {HEIGHT}" role=img aria-label="{escape(key)} by {x_label}">'
           + "".join(grid)
           + f'<text class=axis x="{(LEFT + WIDTH - RIGHT) / 2:g}" y="{HEIGHT - 6}" text-anchor=middle>{x_label}</text>'
           + "".join(line(run, points, "trial", str(n)) for run, n, points in faded)
           + "".join(line(run, points, "curve", "best" if run.run_id in notes else "") for run, points in curves)
           + "</svg>")
    drawn = {run.run_id for run, _ in curves}
    legend = "".join(
        f'<li data-run="{run.run_id}"><span class=swatch style="background:{styles[run.run_id].color}"></span>'
        f"{escape(label(run))}"
        + (f" <small>({escape(notes[run.run_id])})</small>" if run.run_id in notes else "") + "</li>"
        if run.run_id in drawn else
        f'<li data-run="{run.run_id}" class=absent>{escape(label(run))} <small>(no values)</small></li>'
        for run in runs)
    return (f'<figure class=series data-series="{escape(key)}"><figcaption><h3>{escape(key)}</h3></figcaption>'
            f"{svg}<ul class=legend>{legend}</ul></figure>")


def picture_order(item: tuple[str, Upload]) -> tuple[bool, str]:
    """Confusion matrices first, then the rest by name."""
    return "confusion" not in item[0], item[0]


def run_pictures(run: RunRecord, runs: list[RunRecord], styles: dict[str, Style]) -> str:
    """The run's uploaded images in a grid; for one whose workspace file no longer holds it, why not."""
    labels = {other.run_id: label(other) for other in runs}
    pictures = sorted(((key, upload) for key, upload in run.uploads.items() if upload.extension in IMAGE_TYPES),
                      key=picture_order)
    figures = []
    for key, upload in pictures:
        caption = escape(key.removeprefix("pictures/"))
        if upload.kept:
            data = f"data:{IMAGE_TYPES[upload.extension]};base64,{base64.b64encode(upload.file.read_bytes()).decode()}"
            image = f'<img src="{data}" alt="{escape(label(run))}: {caption}">'
            figures.append(f'<figure><button type=button class=zoom aria-pressed=false title="Larger / smaller">'
                           f"{image}</button><figcaption>{caption}</figcaption></figure>")
            continue
        if upload.overwritten_by:
            why = (f"{escape(str(upload.file))} was overwritten by a later run, "
                   f"{escape(labels.get(upload.overwritten_by, upload.overwritten_by[:8]))}")
        else:
            why = f"{escape(str(upload.file))} no longer exists"
        figures.append(f"<figure class=not-kept><figcaption>{caption}</figcaption>"
                       f"<p>Not kept for this run: {why}.</p></figure>")
    body = (f"<div class=pictures>{''.join(figures)}</div>" if figures
            else "<p class=muted>No pictures were uploaded to this run.</p>")
    return (f'<section class=run id="run-{run.run_id[:8]}" data-run="{run.run_id}"><h3>'
            f'<span class=swatch style="background:{styles[run.run_id].color}"></span>{escape(label(run))}</h3>'
            f"{body}</section>")


CSS = """
:root { color-scheme: light; --border: #d0d7de; --muted: #57606a; --differs: #fff1c2; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       max-width: 1400px; margin: 0 auto; padding: 8px 24px 48px; }
h1 { font-size: 1.6rem; margin: 16px 0 4px; }
h2 { font-size: 1.25rem; margin: 28px 0 10px; border-bottom: 1px solid var(--border); padding-bottom: 4px; }
h3 { font-size: 1rem; margin: 0 0 6px; }
.muted, caption { color: var(--muted); }
caption { text-align: left; font-size: 13px; padding: 6px 8px; }
.table-box { overflow-x: auto; border: 1px solid var(--border); border-radius: 6px; }
table.runs { border-collapse: collapse; font-size: 14px; min-width: 100%; }
table.runs th, table.runs td { padding: 4px 10px; border-top: 1px solid var(--border); text-align: left;
                               white-space: nowrap; }
table.runs thead th { vertical-align: bottom; white-space: normal; min-width: 5em; background: #f6f8fa; }
table.runs th.group { text-align: center; font-size: 12px; text-transform: uppercase; letter-spacing: .04em;
                      color: var(--muted); border-top: 0; }
table.runs .number { text-align: right; font-variant-numeric: tabular-nums; }
table.runs tbody th { font-weight: 600; }
table.runs thead th.differs, .differs { background: var(--differs); }
th button { font: inherit; font-weight: 600; color: inherit; background: none; border: 0; padding: 0;
            cursor: pointer; text-align: inherit; }
th button::after { content: "\\00A0\\2195"; color: var(--muted); }
th[aria-sort=ascending] button::after { content: "\\00A0\\25B2"; }
th[aria-sort=descending] button::after { content: "\\00A0\\25BC"; }
th button:focus-visible, .table-box:focus-visible { outline: 2px solid #0969da; outline-offset: 2px; }
a { color: #0969da; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 540px), 1fr)); gap: 16px; }
figure { margin: 0; min-width: 0; border: 1px solid var(--border); border-radius: 6px; padding: 8px 12px; }
svg.chart { display: block; width: 100%; height: auto; font-size: 12px; }
svg.chart text { fill: var(--muted); }
svg.chart .grid { stroke: #e5e7eb; }
svg.chart .curve { fill: none; stroke-width: 2.2; stroke-linejoin: round; }
svg.chart .trial { fill: none; stroke-width: 1; stroke-opacity: .35; }
.legend { list-style: none; margin: 6px 0 0; padding: 0; font-size: 13px; }
.legend .absent { color: var(--muted); }
.swatch { display: inline-block; width: 16px; height: 4px; border-radius: 2px; margin-right: 6px;
          vertical-align: middle; }
section.run { margin-bottom: 20px; }
.pictures { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 280px), 1fr)); gap: 12px; }
.pictures img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
.pictures .zoom { display: block; width: 100%; padding: 0; border: 0; background: none; cursor: zoom-in; }
.pictures .zoom[aria-pressed=true] { cursor: zoom-out; }
.pictures figure:has(.zoom[aria-pressed=true]) { grid-column: 1 / -1; }
.pictures figcaption { text-align: center; font-size: 13px; color: var(--muted); }
.not-kept p { color: var(--muted); font-style: italic; overflow-wrap: anywhere; }
"""

# The table sorts on a click of a column's button: numbers best (largest) first, text A to Z; a
# second click reverses. Empty cells stay last; aria-sort tells screen readers the order.
# A picture's button enlarges it to the row's width (confusion matrices are hard to read small).
SCRIPT = """
for (const button of document.querySelectorAll("table.runs thead button")) {
  button.addEventListener("click", () => {
    const th = button.closest("th"), table = th.closest("table"), body = table.tBodies[0];
    const column = Number(th.dataset.column), numeric = th.dataset.type === "number";
    const first = numeric ? "descending" : "ascending";
    const order = th.getAttribute("aria-sort") === first ? (numeric ? "ascending" : "descending") : first;
    for (const other of table.querySelectorAll("th[aria-sort]")) other.removeAttribute("aria-sort");
    th.setAttribute("aria-sort", order);
    const sign = order === "ascending" ? 1 : -1;
    const value = row => row.cells[column].dataset.value;
    const rows = Array.from(body.rows).sort((a, b) => {
      const x = value(a), y = value(b);
      if (x === "" || y === "") return (x === "") - (y === "");
      return sign * (numeric ? Number(x) - Number(y) : x.localeCompare(y));
    });
    body.append(...rows);
  });
}
for (const button of document.querySelectorAll(".pictures .zoom")) {
  button.addEventListener("click", () => {
    button.setAttribute("aria-pressed", String(button.getAttribute("aria-pressed") !== "true"));
  });
}
"""
