"""The download cache: validated bytes of remote URLs, kept across runs in ``.cache/download``.

Only the coordinating process (the one running the stage) reads and writes it: on a Ray cluster
the workers fetch, and the bytes they keep come back here.
"""

from __future__ import annotations

from pathlib import Path

from imgpipe.files import Folders, sha256, write_atomic


class UrlCache:
    """Validated bytes of remote URLs, so an interrupted run does not fetch them again.

    ``objects/<sha256>`` holds content, ``urls/<sha256 of URL>`` the content hash the URL gave.
    Content is checked against its hash on every read, so a damaged entry is refetched.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.scratch = root / "tmp"
        self.folders = Folders()

    def _url_entry(self, url: str) -> Path:
        key = sha256(url.encode("utf-8"))
        return self.root / "urls" / key[:2] / key

    def object_path(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / digest

    def get(self, url: str) -> bytes | None:
        try:
            digest = self._url_entry(url).read_text(encoding="ascii").strip()
            data = self.object_path(digest).read_bytes()
        except (OSError, UnicodeDecodeError):
            return None
        return data if sha256(data) == digest else None

    def put(self, url: str, data: bytes, digest: str) -> None:
        """Remember that ``url`` gave ``data`` (whose sha256 is ``digest``)."""
        obj = self.object_path(digest)
        if not obj.exists():
            write_atomic(obj, data, self.scratch, self.folders)
        write_atomic(self._url_entry(url), digest.encode("ascii"), self.scratch, self.folders)
