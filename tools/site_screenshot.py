"""Screenshot of the documentation site's home page (docs/site.png, shown on the contributing page).

    python -m tools.site_screenshot --out docs/site.png

Builds the site as `make docs` does (`mkdocs build --strict`, into a temporary folder), serves
it with a threaded http.server on 127.0.0.1 (a free port), opens the home page in Debian's
headless Chromium (`make browser`) and saves the screenshot at a laptop width. It refuses to
save one when the page requested any other host. tests/test_docs_site.py uses the same build and
server.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(site: Path, config: Path = ROOT / "mkdocs.yml", timeout: float = 300) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` of ``config`` into ``site``, run from the config's folder (the
    snippets' base path); the finished process, with its output, whatever its exit status."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's end-of-life banner, on every build
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=config.parent, env=env, capture_output=True, text=True,
                          timeout=timeout)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test and tool output clean
        pass


@contextmanager
def serving(folder: Path) -> Iterator[str]:
    """``folder`` over HTTP on 127.0.0.1 (a free port), as ``http://127.0.0.1:PORT``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def shoot(url: str, out: Path, width: int = 1280, height: int = 800) -> None:
    """The home page at ``url`` as a PNG at ``out``; SystemExit with one line when it cannot."""
    from tests.browser import BrowserMissing, chromium

    try:
        with chromium() as browser:
            page = browser.page(width=width, height=height)
            page.goto(url + "/")
            page.wait_for_selector("nav.md-nav--primary")
            page.wait_for_function("Array.from(document.images).every(image => image.complete)")
            foreign = browser.foreign_requests()
            if foreign:  # the site must work offline; a screenshot of one that does not would mislead
                raise SystemExit(f"site_screenshot: the site requested other hosts: {', '.join(foreign)}")
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
    except BrowserMissing as exc:
        raise SystemExit(f"site_screenshot: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.site_screenshot", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/site.png"), help="PNG to write (%(default)s)")
    parser.add_argument("--width", type=int, default=1280, help="viewport width in CSS px (%(default)s)")
    parser.add_argument("--height", type=int, default=800, help="viewport height in CSS px (%(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        site = Path(folder) / "site"
        built = build(site)
        if built.returncode != 0:
            print(f"site_screenshot: mkdocs build --strict failed:\n{built.stdout}{built.stderr}", file=sys.stderr)
            return 1
        with serving(site) as url:
            shoot(url, args.out.resolve(), args.width, args.height)
    print(f"site_screenshot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
