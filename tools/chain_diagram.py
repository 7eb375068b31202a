"""The pipeline's chain as an SVG picture for the documentation site (docs/chain.svg).

    python -m tools.chain_diagram                 write docs/chain.svg
    python -m tools.chain_diagram --check         exit 1 when docs/chain.svg is not what this draws

README.md draws the same chain with mermaid, which GitHub renders; the site cannot, since
mermaid.js would come from a CDN and the site loads nothing from other hosts. So this draws it
here, as plain SVG text from a fixed layout: the same code gives the same bytes, and
tests/test_docs_site.py checks the committed file against it. The edges are those `dvc dag`
draws (tests/test_demo_pipeline.py checks them on a real pipeline), each stage with the folder
it writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from xml.sax.saxutils import escape

OUT = Path(__file__).resolve().parents[1] / "docs" / "chain.svg"
WIDTH, BOX_W, BOX_H = 680, 280, 52
LEFT, RIGHT, CENTRE = 160, 520, 340

# name -> (centre x, top y, title, what it writes, kind); kind: data (DVC-tracked input or release), stage, service
NODES: dict[str, tuple[int, int, str, str, str]] = {
    "data": (CENTRE, 16, "data/", "manifests + class folders, data.dvc", "data"),
    "download": (CENTRE, 100, "download", "build/images", "stage"),
    "pack": (CENTRE, 184, "pack", "build/tfrecords", "stage"),
    "train_resnet": (LEFT, 268, "train_resnet", "build/models/resnet50v2", "stage"),
    "train_automl": (RIGHT, 268, "train_automl", "build/models/autokeras", "stage"),
    "export@resnet50v2": (LEFT, 352, "export@resnet50v2", "build/onnx/resnet50v2", "stage"),
    "export@autokeras": (RIGHT, 352, "export@autokeras", "build/onnx/autokeras", "stage"),
    "serve": (CENTRE, 436, "serve", "build/serving, build/triton", "stage"),
    "release": (LEFT, 520, "release (make release)", "model/, model.dvc", "data"),
    "service": (RIGHT, 520, "python -m serve", "FastAPI + ONNX Runtime", "service"),
}
# (source, target, dashed): solid edges are DVC's; dashed ones are what the service runs on.
EDGES = [
    ("data", "download", False), ("download", "pack", False), ("pack", "train_resnet", False),
    ("pack", "train_automl", False), ("train_resnet", "export@resnet50v2", False),
    ("train_automl", "export@autokeras", False), ("export@resnet50v2", "serve", False),
    ("export@autokeras", "serve", False), ("serve", "release", False), ("serve", "service", True),
    ("release", "service", True),
]
FILL = {"data": "#e8eaf6", "stage": "#ffffff", "service": "#f1f8e9"}
STROKE = {"data": "#3949ab", "stage": "#3949ab", "service": "#558b2f"}


def edge(source: str, target: str, dashed: bool) -> str:
    sx, sy, *_ = NODES[source]
    tx, ty, *_ = NODES[target]
    if sy == ty:  # side by side: from the right edge of one to the left edge of the other
        x1, y1, x2, y2 = sx + BOX_W // 2, sy + BOX_H // 2, tx - BOX_W // 2 - 2, ty + BOX_H // 2
    else:
        x1, y1, x2, y2 = sx, sy + BOX_H, tx, ty - 2
    dash = ' stroke-dasharray="5 4"' if dashed else ""
    return (f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="#5c6bc0" stroke-width="1.6"{dash} '
            'marker-end="url(#arrow)"/>')


def node(name: str) -> str:
    x, y, title, output, kind = NODES[name]
    rx = 18 if kind == "data" else 6
    dash = ' stroke-dasharray="5 4"' if kind == "service" else ""
    return "\n".join([
        f'<g id="{escape(name)}">',
        f'<rect x="{x - BOX_W // 2}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="{rx}" fill="{FILL[kind]}" '
        f'stroke="{STROKE[kind]}" stroke-width="1.5"{dash}/>',
        f'<text x="{x}" y="{y + 21}" text-anchor="middle" font-size="14" font-weight="bold">{escape(title)}</text>',
        f'<text x="{x}" y="{y + 40}" text-anchor="middle" font-size="12" font-family="monospace" '
        f'fill="#37474f">{escape(output)}</text>',
        "</g>",
    ])


def render() -> str:
    height = max(y for _, y, *_ in NODES.values()) + BOX_H + 16
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" role="img" '
        'aria-label="The DVC stages from data/ to the released model, and the service">',
        "<title>The pipeline's chain, as dvc dag draws it</title>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#5c6bc0"/></marker></defs>',
        *(edge(*e) for e in EDGES),
        *(node(name) for name in NODES),
        "</svg>",
        "",
    ])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.chain_diagram", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="SVG to write (default: docs/chain.svg)")
    parser.add_argument("--check", action="store_true", help="only compare --out with what this draws")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    svg = render()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != svg:
            print(f"{args.out} is not what tools.chain_diagram draws: run `python -m tools.chain_diagram`",
                  file=sys.stderr)
            return 1
        return 0
    args.out.write_text(svg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
