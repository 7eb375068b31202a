"""Compare Neptune runs without a Neptune server: ``python -m tools.compare`` (see cli.py).

    runs = find_runs(Path(".neptune"))
    print(table(select(runs, models=["resnet50v2"]), sort="metrics/val/macro_f1"))
"""

from tools.compare.cli import NAME, main
from tools.compare.report import chart
from tools.compare.runs import RunRecord, final_metrics, find_runs, read_run
from tools.compare.table import DEFAULT_METRICS, HEADLINE, Column, layout, select, shown, sort_runs, table

__all__ = ["DEFAULT_METRICS", "HEADLINE", "NAME", "Column", "RunRecord", "chart", "final_metrics", "find_runs",
           "layout", "main", "read_run", "select", "shown", "sort_runs", "table"]
