"""Browse the download stage's image shards: images per class, one class's images, or those as files.

    python -m tools.images list build/images                         images per class
    python -m tools.images list build/images --label cat             sha256, format, WxH and url of each, by sha256
    python -m tools.images extract build/images --label cat --out DIR [--limit N]
                                                                     DIR/cat/<sha256>.<ext>, the first N by sha256

Only metadata is read to list; extracting reads the bytes of the images it writes. An existing
file of the same name and bytes is left as it is (rerunning is safe); one with other bytes is an
error, never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from imgpipe.cli import StageError, at_least, entry_parser, run
from imgpipe.files import write_atomic
from imgpipe.shards import StoredImage, iter_images

NAME = "images"


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(f"python -m tools.{NAME}", __doc__.split("\n")[0])
    # The commands with their flags under --help, as the docstring shows them.
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n")[1]
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="images per class, or one class's images")
    listing.add_argument("images", type=Path, help="the download stage's output (build/images)")
    listing.add_argument("--label", help="list this class's images instead of the counts")
    extract = commands.add_parser("extract", help="write one class's images as DIR/<label>/<sha256>.<ext>")
    extract.add_argument("images", type=Path, help="the download stage's output (build/images)")
    extract.add_argument("--label", required=True, help="the class to extract")
    extract.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write <label>/ into")
    extract.add_argument("--limit", type=at_least(1), default=None, metavar="N",
                         help="the first N images by sha256 (default: all)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def class_images(folder: Path, label: str) -> list[StoredImage]:
    """The images of class ``label``, by sha256; an unknown class is an error listing the known ones."""
    found: list[StoredImage] = []
    labels: set[str] = set()
    for image in iter_images(folder):
        labels.add(image.meta.label)
        if image.meta.label == label:
            found.append(image)
    if not found:
        raise StageError(f"{folder} has no images labelled {label!r} (labels: {', '.join(sorted(labels))})")
    return sorted(found, key=lambda image: image.digest)


def count_table(folder: Path) -> list[str]:
    counts = Counter(image.meta.label for image in iter_images(folder))
    width = max(len("label"), *map(len, counts))
    total = sum(counts.values())
    digits = max(len("images"), len(str(total)))
    rows = [f"{label:<{width}}  {n:>{digits}}" for label, n in sorted(counts.items())]
    return [f"{'label':<{width}}  {'images':>{digits}}", *rows, f"{'total':<{width}}  {total:>{digits}}"]


def image_line(image: StoredImage) -> str:
    meta = image.meta
    return f"{image.digest}  {meta.format:<4}  {meta.width}x{meta.height}  {meta.url}"


def extract(folder: Path, label: str, out: Path, limit: int | None) -> tuple[int, int]:
    """Write the class's images (the first ``limit``); returns (written, already there)."""
    written = present = 0
    for image in class_images(folder, label)[:limit]:
        target = out / label / f"{image.digest}.{image.extension}"
        data = image.read()
        if target.exists():
            if target.read_bytes() != data:
                raise StageError(f"{target} exists with other bytes; not overwritten (remove it, or choose "
                                 "another --out)")
            present += 1
            continue
        write_atomic(target, data)
        target.chmod(0o644)  # an ordinary file to open with anything (mkstemp made it private)
        written += 1
    return written, present


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "list":
        if args.label is None:
            lines = count_table(args.images)
        else:
            lines = [image_line(image) for image in class_images(args.images, args.label)]
        print("\n".join(lines))
        return
    written, present = extract(args.images, args.label, args.out, args.limit)
    print(f"{NAME}: {written} images of {args.label!r} written to {args.out / args.label}/"
          + (f" ({present} already there)" if present else ""))


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), NAME)
