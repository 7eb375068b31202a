"""Keep notebooks/ stored without outputs (they are executed by the tests, not read from git).

    python -m tools.notebooks            list notebooks holding outputs; exit 1 if any, 2 if one is unreadable
    python -m tools.notebooks --strip    remove outputs, execution counts and run metadata in place
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FOLDER = Path(__file__).resolve().parent.parent / "notebooks"
RUN_METADATA = ("execution", "collapsed", "scrolled")  # per-cell keys Jupyter adds when running


def notebooks(folder: Path = FOLDER) -> list[Path]:
    return sorted(folder.glob("*.ipynb"))


def dirty_cells(notebook: dict) -> list[int]:
    """Indexes of code cells that hold outputs, an execution count or run metadata."""
    return [i for i, cell in enumerate(notebook["cells"]) if cell["cell_type"] == "code" and (
        cell.get("outputs") or cell.get("execution_count") is not None
        or any(key in cell.get("metadata", {}) for key in RUN_METADATA))]


def strip(notebook: dict) -> dict:
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
            for key in RUN_METADATA:
                cell.get("metadata", {}).pop(key, None)
    return notebook


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.notebooks", description=__doc__.split("\n")[0])
    parser.add_argument("--strip", action="store_true", help="strip outputs in place")
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dirty = 0
    for path in args.paths or notebooks():
        try:
            notebook = json.loads(path.read_text(encoding="utf-8"))
            cells = dirty_cells(notebook)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"{path}: not a readable notebook ({type(exc).__name__}: {exc})", file=sys.stderr)
            return 2
        if cells and args.strip:
            path.write_text(json.dumps(strip(notebook), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            print(f"{path}: stripped {len(cells)} cells")
        elif cells:
            dirty += 1
            print(f"{path}: cells {cells} hold outputs; run `python -m tools.notebooks --strip`", file=sys.stderr)
    return 1 if dirty else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
