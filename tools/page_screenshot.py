"""Screenshot of the service's page at / with an image classified (README's picture).

    python -m tools.page_screenshot --bundle model --image data/cat/0001.png --out docs/serve-page.png

Starts the service on the bundle (loopback, a free port), opens the page in Debian's headless
Chromium (`make browser`), uploads the image through the page's file input as a person would,
waits for the result and saves a full-page screenshot at a laptop width.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imgpipe.cli import StageError, at_least, entry_parser, run

NAME = "page_screenshot"


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(f"python -m tools.{NAME}", __doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="serving bundle (model/ or build/serving/)")
    parser.add_argument("--image", type=Path, required=True, help="image to classify on the page")
    parser.add_argument("--out", type=Path, default=Path("docs/serve-page.png"), help="PNG to write (%(default)s)")
    parser.add_argument("--width", type=at_least(320), default=1280, help="viewport width in CSS px (%(default)s)")
    parser.add_argument("--height", type=at_least(320), default=800,
                        help="viewport height in CSS px; the screenshot is the full page (%(default)s)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def shoot(url: str, image: Path, out: Path, width: int, height: int) -> str:
    """Classify ``image`` on the page at ``url`` and save the screenshot; returns the label shown."""
    from tests.browser import BrowserMissing, chromium

    try:
        with chromium() as browser:
            page = browser.page(width=width, height=height)
            page.goto(url + "/")
            page.wait_for_selector("#model-card", state="visible")
            page.set_input_files("#file", str(image))
            page.wait_for_selector('#result[data-state="done"], #result[data-state="error"]')
            if page.get_attribute("#result", "data-state") == "error":
                raise StageError(f"--image {image}: the service refused it: {page.inner_text('#error')}")
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            foreign = browser.foreign_requests()
            if foreign:  # the page must work offline; a screenshot of one that does not would mislead
                raise StageError(f"the page requested other hosts: {', '.join(foreign)}")
            return page.inner_text("#label")
    except BrowserMissing as exc:
        raise StageError(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.image.is_file():
        raise StageError(f"--image {args.image}: no such file")
    from serve.app import create_app
    from serve.bundle import BundleError
    from serve.running import running
    from serve.settings import resolve

    try:
        app = create_app(resolve(args.bundle))
    except (BundleError, ValueError) as exc:
        raise StageError(str(exc)) from None  # names the bundle file that is wrong
    with running(app) as url:
        label = shoot(url, args.image, args.out, args.width, args.height)
    print(f"{NAME}: {args.image} classified as {label!r} on the page; screenshot in {args.out}")


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), NAME)
