"""Release the serving bundle: copy ``build/serving/`` to ``model/`` and ``dvc add model``.

    python -m tools.release            # or: make release

``model.dvc`` (in git) then names the released model, so a serving host needs only
``dvc pull model.dvc`` and ``python -m serve``. The bundle is byte-reproducible, so releasing
an unchanged pipeline leaves ``model.dvc`` unchanged.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from imgpipe.bundle import METADATA, evaluated_metrics, missing_files
from imgpipe.cli import StageError, entry_parser, run
from imgpipe.files import write_folder_atomic
from imgpipe.training.evaluation import chance_warning

NAME = "release"


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(f"python -m tools.{NAME}", __doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("build/serving"), help="bundle to release (%(default)s)")
    parser.add_argument("--out", type=Path, default=Path("model"), help="release folder, tracked by OUT.dvc "
                                                                         "(%(default)s)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def example_image() -> str:
    """An image of the data set for the printed curl line (not one of the demo's deliberately
    bad rows, which live in data/bad/)."""
    folder = Path("data")
    for path in sorted(folder.rglob("*.png")) if folder.is_dir() else []:
        if "bad" not in path.relative_to(folder).parts:
            return str(path)
    return "your-image.jpg"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    missing = missing_files(args.bundle)
    if missing:
        raise StageError(f"--bundle {args.bundle}: not a serving bundle (missing {', '.join(missing)}); "
                         "run `dvc repro` first")
    metadata = json.loads((args.bundle / METADATA).read_text())
    metrics = evaluated_metrics(args.bundle, metadata)
    write_folder_atomic(args.out, {path.name: path.read_bytes() for path in sorted(args.bundle.iterdir())
                              if path.is_file()})
    added = subprocess.run([sys.executable, "-m", "dvc", "add", "--quiet", str(args.out)], capture_output=True,
                           text=True)
    if added.returncode != 0:
        raise StageError(f"dvc add {args.out} failed: {(added.stderr or added.stdout).strip()}")
    print(f"{NAME}: {metadata['name']} version {metadata['version']} (accuracy val "
          f"{metrics['val']['accuracy']:.3f}, test {metrics['test']['accuracy']:.3f}) is in {args.out}/, tracked by "
          f"{args.out}.dvc; share it with `git add {args.out}.dvc && git commit` and `dvc push`")
    if not metrics["beats_baseline"]:
        val = metrics["val"]
        print("  WARNING, " + chance_warning(val["macro_f1"], val["baseline_macro_f1"], metrics["baseline_margin"],
                                             then="released anyway, as the serve stage chose it"))
    print(f"  start the service:  python -m serve --bundle {args.out}")
    print(f"  try it:             curl -F image=@{example_image()} http://127.0.0.1:8000/predict")


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), NAME)
