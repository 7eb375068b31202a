"""The download stage on local sources, and its command-line contract (exit codes, one-line errors)."""

from __future__ import annotations

import csv
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
from tests.shard_files import folder_bytes, kept_images

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
    return set(kept_images(folder))


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
    assert sorted(p.name for p in Path("out").iterdir()) == ["images-00000-of-00001.tar"]


def test_refuses_an_output_folder_holding_foreign_files(workdir):
    put("imgs/a.png", images.rgb_png(1))
    Path("m.csv").write_text("url,label\nimgs/a.png,x\n")
    put("out/notes.txt", b"mine")
    with pytest.raises(StageError, match="notes.txt"):
        download.main(["--manifest", "m.csv", "--out", "out"])
    assert Path("out/notes.txt").read_bytes() == b"mine"
    # The loose-file layout of earlier versions is not this stage's either: nothing is deleted.
    Path("out/notes.txt").unlink()
    put(f"out/x/{'0' * 64}.png", b"old")
    with pytest.raises(StageError, match="holds x,"):
        download.main(["--manifest", "m.csv", "--out", "out"])
    assert Path(f"out/x/{'0' * 64}.png").exists()


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
    assert "4 rows -> 4 images in 2 classes (1 shard), 0 dropped" in ok.stdout


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("download:\n  fetches_per_core: many\n",
         "params.yaml: download.fetches_per_core: input should be a valid integer (got 'many')"),
        ("download:\n  workers: 4\n", "params.yaml: download.workers: unknown key"),
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


def test_rejected_rows_follow_the_manifest_and_output_ignores_how_rows_were_cut(workdir):
    """Drops found while fetching and duplicates found per hash bucket are merged back into
    manifest order; the shards and reports are the same bytes however many rows a task holds
    and however many processes ran them."""
    pictures = [put(f"imgs/{i}.png", images.rgb_png(i)) for i in range(12)]
    order = [0, 1, 0, 2, "missing", 3, 1, 4, 5, 6, "s3", 5, 7, 8, 9, 10, 11, 2, 9]
    lines = ["url,label"]
    for entry in order:
        lines.append({"missing": "imgs/missing.png,a", "s3": "s3://bucket/x.png,a"}.get(entry, f"imgs/{entry}.png,a"))
    Path("m.csv").write_text("\n".join(lines) + "\n")
    outputs = {}
    for rows_per_task, processes in [(256, 1), (1, 2), (3, 2)]:
        out = f"out-{rows_per_task}-{processes}"
        download.main(["--manifest", "m.csv", "--out", out, "--report", f"{out}-report/metrics.json",
                       "--rows-per-task", str(rows_per_task), "--processes", str(processes)])
        outputs[out] = folder_bytes(out) | {f"report/{k}": v for k, v in folder_bytes(f"{out}-report").items()}
    first, *others = outputs.values()
    assert all(other == first for other in others)
    with Path("out-1-2-report/rejected.csv").open() as handle:
        rejected = [(row["url"], row["reason"]) for row in csv.DictReader(handle)]
    assert [url for url, _ in rejected] == [
        "imgs/0.png", "imgs/missing.png", "imgs/1.png", "s3://bucket/x.png", "imgs/5.png", "imgs/2.png", "imgs/9.png"]
    assert [reason for _, reason in rejected] == [
        "duplicate", "not_found", "duplicate", "unsupported_scheme", "duplicate", "duplicate", "duplicate"]
    assert json.loads(Path("out-1-2-report/metrics.json").read_text())["total"] == len(order)
    assert set(kept_images("out-1-2")) == {f"a/{digest(p)}.png" for p in pictures}
