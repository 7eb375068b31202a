"""Write the embedded demo data set: scikit-learn's 1,797 handwritten digits as image files.

    python -m tools.demo_data --out data

Nothing can be downloaded at run time, so the demo uses real data that ships inside a PyPI
package. The 8x8 digits become files the way users' images look: PNG and JPEG, RGB and
grayscale, some with an EXIF orientation tag, of varied sizes and aspect ratios. Classes 0-8
are listed in ``manifest.csv`` (relative paths); class 9 is a local folder of images
(``local/9/``), the way a user adds a class from disk. A few bad rows show validation at work.
``params.yaml`` holds the settings this data set needs on top of the repository's params.yaml
(a smaller image size, so the whole demo trains in minutes on a laptop CPU).

The output is a pure function of the seed and the pinned package versions: regenerating it
gives byte-identical files, so ``data.dvc`` stays valid.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from imgpipe.files import replacing_folder

SEED = 2026
FOLDER_CLASS = 9  # delivered as a folder source instead of manifest rows
EXIF_ORIENTATION = 0x0112
# Transpose that stores an upright picture so that EXIF orientation N displays it upright again.
STORE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def render(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Dark ink on light paper, the digit scaled up and placed off-centre on a non-square sheet."""
    side = int(rng.integers(36, 120))
    width = int(side * rng.uniform(1.0, 1.8))
    height = int(side * rng.uniform(1.0, 1.8))
    if rng.random() < 0.5:
        width, height = height, width
    ink = Image.fromarray((digit * (255 / 16)).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
    paper = int(rng.integers(215, 256))
    sheet = Image.new("L", (width, height), 0)
    sheet.paste(ink, (int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))))
    gray = np.asarray(sheet, dtype=np.float32) / 255
    if rng.random() < 0.4:
        return Image.fromarray(np.round(paper * (1 - gray)).astype(np.uint8), "L")
    paper_rgb = rng.integers(200, 256, size=3).astype(np.float32)
    ink_rgb = rng.integers(0, 90, size=3).astype(np.float32)
    rgb = paper_rgb * (1 - gray[..., None]) + ink_rgb * gray[..., None]
    return Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")


def encode(image: Image.Image, rng: np.random.Generator) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    if rng.random() < 0.5:
        image.save(buffer, "PNG", optimize=False, compress_level=6)
        return buffer.getvalue(), "png"
    exif = Image.Exif()
    if rng.random() < 0.3:
        orientation = int(rng.integers(2, 9))
        image = image.transpose(STORE_FOR_ORIENTATION[orientation])
        exif[EXIF_ORIENTATION] = orientation
    image.save(buffer, "JPEG", quality=int(rng.integers(80, 96)), exif=exif.tobytes())
    return buffer.getvalue(), "jpg"


def write_bad_rows(root: Path, rows: list[tuple[str, str]], first_png: tuple[str, bytes]) -> None:
    """Rows that the download stage must drop, each for a different reason."""
    bad = root / "bad"
    bad.mkdir()
    (bad / "not_an_image.jpg").write_text("This is a text file that only pretends to be a JPEG.\n")
    jpeg = io.BytesIO()  # noise, so the cut lands in the scan data and only decoding finds it
    noise = np.random.default_rng(SEED).integers(0, 256, size=(160, 160, 3), dtype=np.uint8)
    Image.fromarray(noise).save(jpeg, "JPEG", quality=90)
    (bad / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) * 2 // 3])
    label, data = first_png
    (bad / "duplicate.png").write_bytes(data)
    rows += [
        ("bad/not_an_image.jpg", "3"),
        ("bad/truncated.jpg", "5"),
        ("images/7/missing.png", "7"),
        ("ftp://example.com/digits/seven.png", "7"),
        ("bad/duplicate.png", label),
    ]


# Applied on top of the repository's params.yaml (these keys win); params.yaml itself keeps the
# defaults for users' own photos.
DEMO_PARAMS = """\
# Settings of this data set, applied on top of params.yaml: keys set here win.
# Bringing your own images? Empty this file (or delete the keys) to use params.yaml alone.
pack:
  # The digits are 8x8 pixels scaled up: 64 px loses nothing and trains far faster than 224.
  image_size: 64
augment:
  flip: false               # a mirrored 2, 3 or 7 is not a digit
train:
  resnet:
    # The demo's minutes go here. From scratch on CPU a step costs about the same at batch 32
    # as at 16, so 32 halves the time per image; 10 epochs at twice the rate reach 0.90+.
    epochs: 10
    batch_size: 32
    learning_rate: 0.002    # twice the default, for twice the batch
  automl:
    max_trials: 3
    epochs: 20
    block_types: [vanilla]  # ResNet and Xception searches take hours on a CPU
    input_size: 16          # the originals are 8x8: the search sees 16 px (resized inside the model)
"""


def generate(out: Path) -> int:
    digits = load_digits()
    rng = np.random.default_rng(SEED)
    rows: list[tuple[str, str]] = []
    first_png = None
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        data, extension = encode(render(pixels, rng), rng)
        label = str(int(target))
        folder = Path("local" if target == FOLDER_CLASS else "images", label)
        path = folder / f"{index:04d}.{extension}"
        (out / folder).mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(data)
        if target != FOLDER_CLASS:
            rows.append((path.as_posix(), label))
            if first_png is None and extension == "png":
                first_png = (label, data)
    assert first_png is not None
    write_bad_rows(out, rows, first_png)
    with (out / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["url", "label"])
        writer.writerows(rows)
    (out / "params.yaml").write_text(DEMO_PARAMS, encoding="utf-8")
    return len(digits.images)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.demo_data", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data"), help="folder to create (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace the folder if it exists")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.out.exists() and not args.force:
        sys.exit(f"demo_data: error: {args.out} exists; pass --force to replace it")
    with replacing_folder(args.out) as staging:  # an interrupted run never leaves half a data set
        count = generate(staging)
    print(f"demo_data: wrote {count} digit images and manifest.csv to {args.out}/")


if __name__ == "__main__":
    main()
