"""Why a manifest row did not become an image: one closed list of reasons, shared by every step."""

from __future__ import annotations

REASONS = {
    "invalid_row": "the row has no url or no label",
    "invalid_label": "the label cannot be used as a folder name",
    "unsupported_scheme": "not http(s), file or a local path",
    "invalid_url": "the URL, or a redirect target, cannot be parsed",
    "not_found": "missing local file, or HTTP 404/410",
    "http_error": "any other HTTP error status, after retries where they apply",
    "connection_error": "refused, reset or broken connection, after retries",
    "timeout": "read timeout, or the per-URL deadline was reached",
    "too_many_redirects": "more redirects than download.max_redirects, or a loop",
    "too_large": "declared or actual body larger than download.max_bytes",
    "empty": "zero bytes",
    "not_an_image": "Pillow cannot identify the bytes as an image",
    "unsupported_format": "an image, but not in download.formats",
    "too_many_pixels": "more pixels than download.max_pixels (decompression-bomb guard)",
    "too_small": "shorter side below download.min_side",
    "decode_error": "identified, but the pixels do not fully decode (truncated or corrupt)",
    "duplicate": "same bytes as an earlier row with the same label (kept once)",
    "label_conflict": "same bytes under two or more labels (dropped from all)",
}


class Drop(Exception):
    """A row is dropped; ``reason`` is a key of REASONS, ``detail`` says what exactly."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown drop reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable across worker processes
        return (Drop, (self.reason, self.detail))
