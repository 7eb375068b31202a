"""What a download output holds, as ``{"<label>/<sha256>.<ext>": bytes}``: the layout of the old
loose-file output, so tests can say which images were kept in one line."""

from __future__ import annotations

from pathlib import Path

from imgpipe.shards import iter_images


def kept_images(folder: Path | str) -> dict[str, bytes]:
    return {f"{s.meta.label}/{s.digest}.{s.extension}": s.read() for s in iter_images(Path(folder))}


def folder_bytes(folder: Path | str) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path: for byte-identical comparisons."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
