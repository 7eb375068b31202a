"""Optional API keys: ``--api-key-file PATH`` (one key per line) makes every route but the probes
and the page's static files ask for ``Authorization: Bearer <key>``.

Keys are compared as SHA-256 digests with ``hmac.compare_digest`` against every key, so neither the
time taken nor an early exit tells how much of a guess was right, or which key it was close to.
No key is ever logged or counted: the request log and metrics see only the status.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from fastapi.responses import JSONResponse

from serve.errors import ApiError

CHALLENGE = {"WWW-Authenticate": "Bearer"}


def load_keys(path: Path) -> tuple[str, ...]:
    """The keys in ``path``: one per line; blank lines and lines starting with # are skipped."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--api-key-file {path}: cannot be read ({exc})") from None
    keys = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise ValueError(f"--api-key-file {path}: holds no key (one key per line)")
    short = [number for number, key in enumerate(keys, 1) if len(key) < 16]
    if short:
        raise ValueError(f"--api-key-file {path}: key {short[0]} is shorter than 16 characters; use a random key, "
                         "e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return keys


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyCheck:
    """ASGI middleware: 401 with ``WWW-Authenticate: Bearer`` unless the request carries one of
    ``keys`` as a Bearer token; paths in ``public`` (exact) or under ``public_prefixes`` pass."""

    def __init__(self, app, keys: tuple[str, ...], public: tuple[str, ...],  # type: ignore[no-untyped-def]
                 public_prefixes: tuple[str, ...]) -> None:
        self.app, self.digests = app, tuple(digest(key) for key in keys)
        self.public, self.public_prefixes = public, public_prefixes

    def allowed(self, authorization: bytes) -> bool:
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        candidate, match = digest(token.strip()), False
        for known in self.digests:  # every key, always: no early exit
            match |= hmac.compare_digest(candidate, known)
        return match

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        path = scope.get("path", "")
        if (scope["type"] != "http" or not self.digests or path in self.public
                or path.startswith(self.public_prefixes)):
            return await self.app(scope, receive, send)
        authorization = dict(scope["headers"]).get(b"authorization")
        if authorization is not None and self.allowed(authorization):
            return await self.app(scope, receive, send)
        refused = ApiError(401, "unauthorized", "this service needs an API key: send 'Authorization: Bearer <key>'"
                           if authorization is None else "the API key is not valid", CHALLENGE)
        return await JSONResponse(refused.body(), 401, headers=refused.headers)(scope, receive, send)
