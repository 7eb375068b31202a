"""python -m serve.predict_folder DIR [--out CSV]: predictions for every image under a folder.

Reads and preprocesses in worker threads (Pillow releases the GIL), predicts in batches on ONNX
Runtime, shows progress, and writes one CSV row per file: the label and confidence, or the
reason a file could not be read. Files are listed in sorted order, so the CSV is reproducible.
"""

from __future__ import annotations

import argparse
import csv
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from imgpipe.bundle import MODEL_FILES, SERVING, default_bundle
from imgpipe.cli import at_least
from imgpipe.files import write_csv_atomic
from serve.bundle import Bundle, BundleError
from serve.errors import ApiError
from serve.inputs import decode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve.predict_folder", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="CSV to write (default: print to stdout)")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="serving bundle (default: model/, else build/serving/)")
    parser.add_argument("--batch-size", type=at_least(1), default=SERVING.max_batch,
                        help="images per ONNX Runtime call (default: %(default)s)")
    parser.add_argument("--max-pixels", type=at_least(1), default=SERVING.max_pixels,
                        help="larger images are not decoded; their row says too_many_pixels (default: %(default)s)")
    parser.add_argument("--threads", type=at_least(1), default=4, help="reading/decoding threads")
    parser.add_argument("--precision", choices=sorted(MODEL_FILES), default=SERVING.precision,
                        help="int8: the bundle's static INT8 variant (export.quantize)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def read(path: Path, bundle: Bundle, max_pixels: int) -> np.ndarray | str:
    """The model's pixels for one file, or why it cannot be read."""
    try:
        _, pixels, _ = decode(path.read_bytes(), bundle.image_size, bundle.pad_color, bundle.resample, max_pixels)
        return pixels
    except ApiError as exc:
        return exc.code
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"


def predict_folder(folder: Path, bundle: Bundle, batch_size: int = 32, max_pixels: int = 40_000_000,
                   threads: int = 4) -> list[list[str]]:
    """Rows of (path relative to folder, label, confidence, error)."""
    files = sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))
    rows: list[list[str]] = []
    with ThreadPoolExecutor(threads) as pool, tqdm(total=len(files), unit="img", desc="predict", disable=None,
                                                  file=sys.stderr) as bar:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            results = list(pool.map(lambda path: read(path, bundle, max_pixels), chunk))
            good = [i for i, result in enumerate(results) if not isinstance(result, str)]
            probabilities = bundle.predict(np.stack([results[i] for i in good]))[0] if good else []
            best = dict(zip(good, probabilities, strict=True))
            for i, path in enumerate(chunk):
                name = path.relative_to(folder).as_posix()
                if i in best:
                    k = int(np.argmax(best[i]))
                    rows.append([name, bundle.labels[k], f"{float(best[i][k]):.6f}", ""])
                else:
                    rows.append([name, "", "", str(results[i])])
            bar.update(len(chunk))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.folder.is_dir():
        print(f"predict_folder: error: {args.folder}: not a folder", file=sys.stderr)
        return 2
    try:
        bundle = Bundle.load(args.bundle or default_bundle(), precision=args.precision)
    except BundleError as exc:
        print(f"predict_folder: error: {exc}", file=sys.stderr)
        return 2
    rows = predict_folder(args.folder, bundle, args.batch_size, args.max_pixels, args.threads)
    header = ["path", "label", "confidence", "error"]
    if args.out:
        write_csv_atomic(args.out, header, rows)
    else:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    failed = [row for row in rows if row[3]]
    print(f"predict_folder: {len(rows) - len(failed)} of {len(rows)} images predicted with {bundle.name} "
          f"{bundle.version}" + (f"; {len(failed)} unreadable (listed with their reason)" if failed else "")
          + (f"; {args.out}" if args.out else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
