"""Saving Keras models so that the same weights always give the same file bytes.

``model.save`` stamps the save time into the archive (``metadata.json`` and the zip entry of
the weights) and memory addresses into ``config.json``, so every save of an unchanged model
would change the DVC hash. The archive is rewritten with fixed entry times, without the date
and with the addresses renumbered; the weights file itself is untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold


def renumber_shared_objects(config: Any) -> Any:
    """Keras tags objects serialised more than once with ``shared_object_id`` = their Python
    ``id()``, a memory address that differs on every run: number them by first appearance."""
    numbers: dict[Any, int] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: numbers.setdefault(value, len(numbers)) if key == "shared_object_id" else walk(value)
                    for key, value in node.items()}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    return walk(config)


def save_model(model, path: Path) -> None:  # type: ignore[no-untyped-def]
    """``model.save(path)``, byte-for-byte reproducible, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".save-") as scratch:
        raw, clean = Path(scratch) / "raw.keras", Path(scratch) / "clean.keras"
        model.save(raw)
        with zipfile.ZipFile(raw) as source, zipfile.ZipFile(clean, "w") as target:
            for info in source.infolist():
                data = source.read(info)
                if info.filename == "metadata.json":
                    metadata = json.loads(data)
                    metadata.pop("date_saved", None)
                    data = json.dumps(metadata, sort_keys=True).encode()
                elif info.filename == "config.json":
                    data = json.dumps(renumber_shared_objects(json.loads(data))).encode()
                entry = zipfile.ZipInfo(info.filename, date_time=FIXED_TIME)
                entry.compress_type = info.compress_type
                entry.external_attr = 0o644 << 16
                target.writestr(entry, data)
        os.replace(clean, path)
