"""The download stage on local sources, and its command-line contract (exit codes, one-line errors)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imgpipe.cli import StageError
from stages import download
from tests import images

ROOT = Path(__file__).resolve().parents[1]
PARAMS = "download:\n  min_side: 16\n  min_images_per_class: 1\n"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(PARAMS)
    return tmp_path


def put(path: str, data: bytes) -> bytes:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)
    return data


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "stages.download", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def report() -> dict:
    return json.loads(Path("reports/download/metrics.json").read_text())


def files(folder: str) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()}


def test_manifest_paths_file_urls_and_class_folders(workdir):
    a = put("src/pics/a.png", images.rgb_png(1))
    b = put("elsewhere/b.jpg", images.rgb_jpeg(2))
    c = put("folders/cow/nested/c.webp", images.webp(3))
    d = put("folders/dog/d.gif", images.animated_gif(4))
    put("folders/dog/.hidden.png", images.rgb_png(5))  # hidden files are not images of a class
    put("folders/.git/objects.png", images.rgb_png(6))
    Path("src/manifest.csv").write_text(
        "label,url\n"  # columns in any order
        "cat,pics/a.png\n"  # relative to the manifest
        f"cat,file://{(workdir / 'elsewhere/b.jpg').as_posix()}\n"
        f"dog,{(workdir / 'elsewhere/b.jpg').as_posix()}\n"  # same bytes, other label
        ",pics/a.png\n"
        "../escape,pics/a.png\n"
        "cat,s3://bucket/key.png\n"
    )
    download.main(["--manifest", "src/manifest.csv", "folders", "--out", "out"])
    assert files("out") == {
        f"cat/{digest(a)}.png",
        f"cow/{digest(c)}.webp",
        f"dog/{digest(d)}.gif",
    }
    assert digest(b) not in "".join(files("out"))  # label_conflict: dropped from both labels
    rejected = Path("reports/download/rejected.csv").read_text().splitlines()
    reasons = sorted(line.split(",")[2] for line in rejected[1:])
    assert reasons == ["invalid_label", "invalid_row", "label_conflict", "label_conflict", "unsupported_scheme"]
    assert report()["kept_per_class"] == {"cat": 1, "cow": 1, "dog": 1}
    assert not Path("escape").exists() and not Path("out/../escape").exists()


def test_rerun_with_fewer_rows_removes_stale_files(workdir):
    a = put("imgs/a.png", images.rgb_png(1))
    b = put("imgs/b.png", images.rgb_png(2))
    Path("m.csv").write_text("url,label\nimgs/a.png,x\nimgs/b.png,x\n")
    download.main(["--manifest", "m.csv", "--out", "out"])
    assert files("out") == {f"x/{digest(a)}.png", f"x/{digest(b)}.png"}
    Path("m.csv").write_text("url,label\nimgs/b.png,y\n")
    download.main(["--manifest", "m.csv", "--out", "out"])
    assert files("out") == {f"y/{digest(b)}.png"}
    assert sorted(p.name for p in Path("out").iterdir()) == ["y"]


def test_refuses_an_output_folder_holding_foreign_files(workdir):
    put("imgs/a.png", images.rgb_png(1))
    Path("m.csv").write_text("url,label\nimgs/a.png,x\n")
    put("out/notes.txt", b"mine")
    with pytest.raises(StageError, match="notes.txt"):
        download.main(["--manifest", "m.csv", "--out", "out"])
    assert Path("out/notes.txt").read_bytes() == b"mine"


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        (None, "manifest nothere.csv not found"),
        ("link,label\nx.png,a\n", "header lacks url (found: link, label)"),
        ("url\nx.png\n", "header lacks label (found: url)"),
        ("", "header lacks url and label (found: nothing)"),
        ("url,label\nmissing.png,a\n", "no image kept out of 1 rows"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_1(workdir, manifest, expected):
    name = "nothere.csv"
    if manifest is not None:
        name = "m.csv"
        Path(name).write_text(manifest)
    result = cli("--manifest", name, "--out", "out", cwd=workdir)
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_class_below_minimum_fails_after_writing_the_report(workdir):
    for i in range(3):
        put(f"imgs/a{i}.png", images.rgb_png(i))
    put("imgs/b.png", images.rgb_png(10))
    Path("m.csv").write_text("url,label\n" + "".join(f"imgs/a{i}.png,a\n" for i in range(3)) + "imgs/b.png,b\n")
    result = cli("--manifest", "m.csv", "--out", "out", "--min-images-per-class", "2", cwd=workdir)
    assert result.returncode == 1
    assert "fewer than download.min_images_per_class=2 images: 'b' (1)" in result.stderr
    assert report()["kept_per_class"] == {"a": 3, "b": 1}
    ok = cli("--manifest", "m.csv", "--out", "out", "--min-images-per-class", "1", cwd=workdir)
    assert ok.returncode == 0, ok.stderr
    assert "4 rows -> 4 images in 2 classes, 0 dropped" in ok.stdout


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("download:\n  workers: many\n", "params.yaml: download.workers: input should be a valid integer (got 'many')"),
        ("download:\n  wokers: 4\n", "params.yaml: download.wokers: unknown key"),
        ("downlaod: {}\n", "params.yaml: downlaod: unknown key"),
        ("download:\n  formats: [JPG]\n", "params.yaml: download.formats.0: input should be"),
        ("download:\n  min_side: 0\n", "download.min_side: input should be greater than 0 (got 0)"),
        ("download: [\n", "params.yaml: line 2 invalid YAML"),
    ],
)
def test_bad_params_exit_2_with_one_line_naming_the_key(workdir, params, expected):
    put("imgs/a.png", images.rgb_png(1))
    Path("m.csv").write_text("url,label\nimgs/a.png,a\n")
    Path("params.yaml").write_text(params)
    result = cli("--manifest", "m.csv", "--out", "out", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.startswith("download: error: ")
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not Path("out").exists()


def test_flags_override_params_yaml(workdir):
    put("imgs/small.png", images.rgb_png(1, size=(20, 20)))
    put("imgs/big.png", images.rgb_png(2, size=(40, 40)))
    Path("m.csv").write_text("url,label\nimgs/small.png,a\nimgs/big.png,a\n")
    download.main(["--manifest", "m.csv", "--out", "out"])  # params.yaml: min_side 16
    assert report()["kept"] == 2
    download.main(["--manifest", "m.csv", "--out", "out", "--min-side", "32"])
    assert report()["kept"] == 1
    assert report()["dropped_by_reason"]["too_small"] == 1
