"""Compare Neptune runs without a Neptune server: replay the offline operation logs on disk.

    python -m tools.compare [--neptune-dir .neptune] [--sort metrics/val/macro_f1] [--chart reports/compare.html]

Each run Neptune records offline is a folder of JSON operation logs. They are read with the
client's own parser and replayed through its own operation classes, so what is shown is exactly
what Neptune would have shown: name, tags, key parameters, final metrics, and learning curves.
The default metric columns are val and test accuracy and macro-F1 side by side, and whether the
model beats the weighted random guess on val (``--metrics`` picks others, ``--metrics all`` shows all).
"""

from __future__ import annotations

import base64
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgpipe.cli import StageError, entry_parser, run

NAME = "compare"
DEFAULT_METRICS = ["metrics/val/accuracy", "metrics/test/accuracy", "metrics/val/macro_f1", "metrics/test/macro_f1",
                   "metrics/beats_baseline"]


@dataclass
class RunRecord:
    """A run rebuilt from its operation log: single values and series, keyed by 'a/b' paths."""

    folder: Path
    run_id: str
    created: str
    values: dict[str, Any] = field(default_factory=dict)
    series: dict[str, list[tuple[float | None, float]]] = field(default_factory=dict)
    sets: dict[str, set[str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.values.get("sys/name") or self.run_id[:8])

    @property
    def experiment(self) -> str:
        """The DVC experiment the run belongs to (`dvc exp show` lists it by this name), if any."""
        return str(self.values.get("source/dvc_experiment", ""))

    @property
    def tags(self) -> list[str]:
        return sorted(self.sets.get("sys/tags", set()))


def _replayer(record: RunRecord):  # type: ignore[no-untyped-def]
    """An OperationVisitor (Neptune's own) that applies each operation to ``record``."""
    from neptune.internal.operation_visitor import OperationVisitor

    class Replay(OperationVisitor[None]):
        def _assign(self, op) -> None:  # type: ignore[no-untyped-def]
            record.values["/".join(op.path)] = op.value

        visit_assign_float = visit_assign_int = visit_assign_bool = visit_assign_string = _assign
        visit_assign_datetime = _assign

        def visit_log_floats(self, op) -> None:  # type: ignore[no-untyped-def]
            record.series.setdefault("/".join(op.path), []).extend((v.step, v.value) for v in op.values)

        def visit_clear_float_log(self, op) -> None:  # type: ignore[no-untyped-def]
            record.series["/".join(op.path)] = []

        def visit_add_strings(self, op) -> None:  # type: ignore[no-untyped-def]
            record.sets.setdefault("/".join(op.path), set()).update(op.values)

        def visit_remove_strings(self, op) -> None:  # type: ignore[no-untyped-def]
            record.sets.setdefault("/".join(op.path), set()).difference_update(op.values)

        def visit_clear_string_set(self, op) -> None:  # type: ignore[no-untyped-def]
            record.sets["/".join(op.path)] = set()

        def visit_delete_attribute(self, op) -> None:  # type: ignore[no-untyped-def]
            key = "/".join(op.path)
            for store in (record.values, record.series, record.sets):
                store.pop(key, None)

        def _ignore(self, op) -> None:  # type: ignore[no-untyped-def]
            pass  # files, images and artifacts: not part of a comparison table

        visit_assign_artifact = visit_upload_file = visit_upload_file_content = visit_upload_file_set = _ignore
        visit_log_strings = visit_log_images = visit_clear_string_log = visit_clear_image_log = _ignore
        visit_config_float_series = visit_delete_files = visit_track_files_to_artifact = _ignore
        visit_clear_artifact = visit_copy_attribute = _ignore

    return Replay()


def read_run(folder: Path) -> RunRecord:
    from neptune.core.components.queue.json_file_splitter import JsonFileSplitter
    from neptune.internal.operation import Operation

    meta = json.loads((folder / "metadata.json").read_text())
    record = RunRecord(folder, meta.get("containerId", folder.name), meta.get("createdAt", ""))
    replay = _replayer(record)
    logs = sorted(folder.glob("data-*.log"), key=lambda p: int(p.stem.split("-")[1]))
    for log_file in logs:
        splitter = JsonFileSplitter(log_file)
        try:
            while (entry := splitter.get()) is not None:
                Operation.from_dict(entry["obj"]).accept(replay)
        finally:
            splitter.close()
    return record


def find_runs(neptune_dir: Path) -> list[RunRecord]:
    folders = sorted(p for p in neptune_dir.glob("*/run__*") if (p / "metadata.json").exists())
    return [read_run(folder) for folder in folders]


def final_metrics(record: RunRecord) -> dict[str, float | bool]:
    """The run's final values under metrics/: numbers, and flags such as metrics/beats_baseline."""
    return {key: value for key, value in record.values.items()
            if key.startswith("metrics/") and isinstance(value, int | float)}


def shown(value: float | bool | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def table(runs: list[RunRecord], sort: str | None, params: list[str], metrics: list[str] | None = None) -> str:
    """One row per run. ``metrics``: the final metrics to show (None: ``DEFAULT_METRICS``, ["all"]: every one);
    ``params``: the parameters (empty: those that differ between runs); ``sort``: a final metric, best first."""
    finals = {r.run_id: final_metrics(r) for r in runs}
    known = sorted({key for values in finals.values() for key in values})
    if sort:
        if runs and sort not in known:
            raise StageError(f"--sort {sort}: no run has this final metric (there are: {', '.join(known)})")
        runs = sorted(runs, key=lambda r: (sort not in finals[r.run_id], -float(finals[r.run_id].get(sort, 0))))
    metric_keys = known if metrics == ["all"] else (metrics or DEFAULT_METRICS)
    param_keys = params or sorted({key for r in runs for key in r.values if key.startswith("parameters/")
                                   and len({str(o.values.get(key)) for o in runs}) > 1})
    header = ["run", "id", "created", "experiment", "tags", *param_keys, *metric_keys]
    rows = [[r.name, r.run_id[:8], r.created[:19], r.experiment, ",".join(r.tags),
             *(str(r.values.get(k, "")) for k in param_keys),
             *(shown(finals[r.run_id].get(k)) for k in metric_keys)] for r in runs]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def chart(runs: list[RunRecord], path: Path, table_text: str) -> None:
    """Learning curves, one panel per series, one line per run: PNG, or HTML with the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({key for r in runs for key in r.series})
    if not keys:
        raise StageError("the runs hold no series (per-epoch values) to chart")
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 3 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        for r in runs:
            points = r.series.get(key)
            if points:
                steps = [s if s is not None else i for i, (s, _) in enumerate(points)]
                ax.plot(steps, [v for _, v in points], marker="o", label=r.name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        path.write_bytes(buffer.getvalue())
        return
    picture = base64.b64encode(buffer.getvalue()).decode()
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>Neptune runs</title>"
        f"<h1>Neptune runs ({len(runs)})</h1><pre>{_escape(table_text)}</pre>"
        f"<img alt='learning curves' src='data:image/png;base64,{picture}'>\n")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def main(argv: list[str] | None = None) -> None:
    parser = entry_parser(f"python -m tools.{NAME}", __doc__.split("\n")[0])
    parser.add_argument("--neptune-dir", type=Path, default=Path(".neptune"), help="default: %(default)s")
    parser.add_argument("--sort", help="final metric to sort by, best first, e.g. metrics/val/macro_f1")
    parser.add_argument("--params", nargs="*", default=[],
                        help="parameter paths to show (default: those that differ between runs)")
    parser.add_argument("--metrics", nargs="+", metavar="PATH",
                        help="final metrics to show, or `all` (default: val and test accuracy and macro-F1, "
                             "metrics/beats_baseline)")
    parser.add_argument("--chart", type=Path, help="write learning curves to this .html or .png file")
    args = parser.parse_args(argv)
    runs = find_runs(args.neptune_dir)
    if not runs:
        raise StageError(f"no Neptune runs under {args.neptune_dir}/ (train a model first)")
    text = table(runs, args.sort, args.params, args.metrics)
    print(text)
    if args.chart:
        chart(runs, args.chart, text)
        print(f"{NAME}: learning curves of {len(runs)} runs in {args.chart}")


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), NAME)
