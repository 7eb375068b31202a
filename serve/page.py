"""The page at ``/`` to try the model: static HTML, CSS and JavaScript shipped in serve/page/,
served by the app itself (nothing from other hosts, so it works offline)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(__file__).with_name("page")
PUBLIC_PREFIXES = ("/page/",)  # the page's static files need no key (serve.auth)
PUBLIC_PATHS = ("/",)

# The browser itself enforces "nothing from other hosts": scripts, styles, images and API calls
# come from this origin only (blob: is the annotated PNG's object URL). No inline script or style
# is allowed, which page.js and index.html never need.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob:",
    "connect-src 'self'",
    "form-action 'none'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
])
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new release's page is seen at once
}


def add_page(app: FastAPI) -> None:
    """GET / (the page) and /page/* (its assets); not part of the API's OpenAPI schema."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(ASSETS / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    app.mount("/page", StaticFiles(directory=ASSETS), name="page")
