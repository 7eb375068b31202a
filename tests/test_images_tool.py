"""python -m tools.images: counts per class, one class's images, extraction that never overwrites
other bytes, and one-line errors with the stages' exit codes (run as the user runs it)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests import images
from tests.shards import write_shards

ROOT = Path(__file__).resolve().parent.parent


def tool(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.images", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[str, list[bytes]]]:
    folder = tmp_path_factory.mktemp("tool") / "images"
    made = {"cat": [images.rgb_png(i, size=(20 + i, 10 + i)) for i in range(5)],
            "dog": [images.rgb_jpeg(i) for i in range(3)] + [images.gray_png(7)]}
    write_shards(folder, made, shard_size=2)  # several shards, so that listing crosses them
    return folder, made


def test_list_counts_images_per_class(shards):
    folder, _ = shards
    result = tool("list", folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["label  images", "cat         5", "dog         4", "total       9"]


def test_list_of_a_class_names_each_image_by_sha256(shards):
    folder, made = shards
    result = tool("list", folder, "--label", "dog")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    digests = [hashlib.sha256(data).hexdigest() for data in made["dog"]]
    assert [line.split()[0] for line in lines] == sorted(digests)
    gray = hashlib.sha256(images.gray_png(7)).hexdigest()
    assert f"{gray}  PNG   40x56  images/dog/003" in lines
    assert sum(" JPEG  64x48  images/dog/" in line for line in lines) == 3


def test_extract_writes_the_class_as_files_and_reruns_safely(shards, tmp_path):
    folder, made = shards
    result = tool("extract", folder, "--label", "cat", "--out", tmp_path / "out", "--limit", "3")
    assert result.returncode == 0, result.stderr
    assert "3 images of 'cat' written to" in result.stdout
    written = {p.name: p.read_bytes() for p in (tmp_path / "out" / "cat").iterdir()}
    first = sorted(hashlib.sha256(data).hexdigest() for data in made["cat"])[:3]
    assert sorted(written) == [f"{digest}.png" for digest in first]
    assert all(hashlib.sha256(data).hexdigest() == name.split(".")[0] for name, data in written.items())

    again = tool("extract", folder, "--label", "cat", "--out", tmp_path / "out")
    assert again.returncode == 0, again.stderr
    assert "2 images of 'cat' written to" in again.stdout and "(3 already there)" in again.stdout
    assert len(list((tmp_path / "out" / "cat").iterdir())) == 5


def test_extract_never_overwrites_other_bytes(shards, tmp_path):
    folder, made = shards
    digest = min(hashlib.sha256(data).hexdigest() for data in made["dog"])
    extension = "png" if digest == hashlib.sha256(images.gray_png(7)).hexdigest() else "jpg"
    target = tmp_path / "out" / "dog" / f"{digest}.{extension}"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"something else")
    result = tool("extract", folder, "--label", "dog", "--out", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip() == f"images: error: {target} exists with other bytes; not overwritten " \
                                    "(remove it, or choose another --out)"
    assert target.read_bytes() == b"something else"


@pytest.mark.parametrize(("args", "code", "message"), [
    (["list", "{folder}", "--label", "yak"], 1,
     "images: error: {folder} has no images labelled 'yak' (labels: cat, dog)"),
    (["list", "{missing}"], 1, "images: error: {missing} is not a folder of image shards"),
    (["extract", "{folder}", "--out", "x"], 2, "the following arguments are required: --label"),
    (["extract", "{folder}", "--label", "cat", "--out", "x", "--limit", "0"], 2, "argument --limit: 0 is below 1"),
])
def test_errors_are_one_line_with_the_stages_exit_codes(shards, tmp_path, args, code, message):
    folder, _ = shards
    names = {"folder": folder, "missing": tmp_path / "missing"}
    result = tool(*(arg.format(**names) for arg in args))
    assert result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert message.format(**names) in lines[-1] and "Traceback" not in result.stderr
    assert len(lines) == 1 or code == 2  # argparse's usage lines come before its one-line error
