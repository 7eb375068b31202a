"""Debian's headless Chromium driven by Playwright, for checks on pages the project serves (the
service's page at /, tools.page_screenshot; any later HTML report).

    with chromium() as browser:
        page = browser.page(width=390)
        page.goto(url)
        ...
        assert browser.foreign_requests() == []

The browser is /usr/bin/chromium (`make browser` installs it with apt); Playwright never downloads
its own. Every URL any page asks for is recorded, so a test can assert that nothing left
127.0.0.1. The flags keep Chromium itself quiet too: this machine refuses Google's hosts, and a
browser that phones home would slow every launch and hide what the page requested.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

CHROMIUM = Path("/usr/bin/chromium")
LOCAL_HOSTS = ("127.0.0.1",)
ARGS = [
    "--no-sandbox",  # Chromium's sandbox refuses to start as root (CI, containers)
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    # Every host name fails to resolve: a stray request to another host fails at once, offline or
    # not, and is still recorded (Playwright reports a request before it is resolved).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


class BrowserMissing(RuntimeError):
    pass


class Browser:
    """One launched Chromium: ``page()`` opens a fresh context (own cookies and storage) and
    ``requests`` lists every URL requested through any of them, in order."""

    def __init__(self, browser) -> None:  # type: ignore[no-untyped-def]
        self.browser = browser
        self.requests: list[str] = []

    def page(self, width: int = 1280, height: int = 800, **options):  # type: ignore[no-untyped-def]
        """A new page in a new context of ``width`` x ``height`` CSS pixels; ``options`` go to
        Playwright's ``new_context`` (device_scale_factor, is_mobile, ...)."""
        context = self.browser.new_context(viewport={"width": width, "height": height}, service_workers="block",
                                           **options)
        context.on("request", lambda request: self.requests.append(request.url))
        return context.new_page()

    def foreign_requests(self, hosts: tuple[str, ...] = LOCAL_HOSTS) -> list[str]:
        """Requested URLs that went (or tried to go) to a host outside ``hosts``; in-page URLs
        (blob:, data:, about:) never leave the browser."""
        return [url for url in self.requests if not stays_local(url, hosts)]


def stays_local(url: str, hosts: tuple[str, ...] = LOCAL_HOSTS) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("blob", "data", "about"):
        return True
    return parts.scheme in ("http", "https", "ws", "wss") and parts.hostname in hosts


@contextmanager
def chromium(executable: Path = CHROMIUM) -> Iterator[Browser]:
    """Debian's Chromium, headless, with a fresh temporary profile (Playwright makes one per launch
    and deletes it afterwards), closed when the block ends."""
    if not executable.is_file():
        raise BrowserMissing(f"{executable} is missing: run `make browser` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), headless=True, args=ARGS)
        try:
            yield Browser(browser)
        finally:
            browser.close()
