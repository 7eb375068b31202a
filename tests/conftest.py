"""Fixtures shared by the trainer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages import pack
from tests.test_pack import make_images

PACK_PARAMS = """\
pack:
  image_size: 32
  processes: 1
"""


@pytest.fixture(scope="session")
def records(tmp_path_factory) -> dict[int, Path]:
    """Packed tiny data sets (32 px, 10 images a class) with three classes and with two (the sigmoid head)."""
    root = tmp_path_factory.mktemp("records")
    (root / "params.yaml").write_text(PACK_PARAMS)
    made = {}
    for classes in (3, 2):
        images = root / f"images{classes}"
        make_images(images, {name: 10 for name in ["cat", "dog", "owl"][:classes]})
        pack.main(["--params", str(root / "params.yaml"), "--images", str(images), "--out", str(root / f"tf{classes}"),
                   "--report", str(root / f"pack{classes}.json")])
        made[classes] = root / f"tf{classes}"
    return made
