"""The download stage against a real HTTP server on loopback that fails in every way it can."""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path

import pytest

from stages import download
from tests import http_server as hs
from tests import images
from tests.shard_files import folder_bytes, kept_images

PARAMS = """\
download:
  fetches_per_core: 8
  connect_timeout: 2.0
  read_timeout: 1.0
  deadline: 2.5
  retries: 2
  backoff: 0.05
  retry_after_cap: 5.0
  max_redirects: 4
  max_bytes: 300000
  min_side: 16
  min_images_per_class: 0
"""

# path -> (label, bytes served, expected drop reason or None for kept)
KEEP = {
    "/rgb.png": images.rgb_png(1),
    "/photo.jpg": images.rgb_jpeg(2),
    "/gray.png": images.gray_png(3),
    "/cmyk.jpg": images.cmyk_jpeg(4),
    "/deep.png": images.png16(5),
    "/palette.png": images.palette_png_transparent(6),
    "/lossless.webp": images.webp(7),
    "/animated.gif": images.animated_gif(8),
    "/dup-a.png": images.rgb_png(9),
}
FLAKY = images.rgb_png(10)
LIMITED = images.rgb_png(11)
REDIRECTED = images.rgb_jpeg(12)
CONFLICT = images.rgb_png(13)


def routes() -> dict[str, hs.Route]:
    table = {path: hs.body(data) for path, data in KEEP.items()}
    table.update({
        "/dup-b.png": hs.body(KEEP["/dup-a.png"]),  # same bytes, same label -> duplicate
        "/conflict-cat.png": hs.body(CONFLICT),  # same bytes, two labels -> label_conflict
        "/conflict-dog.png": hs.body(CONFLICT),
        "/flaky.png": hs.fail_then(500, 1, hs.body(FLAKY)),
        "/always-500.png": hs.status(500),
        "/limited.png": hs.fail_then(429, 1, hs.body(LIMITED), {"Retry-After": "1"}),
        "/forbidden.png": hs.status(403),
        "/hop3": hs.redirect("/hop2"),
        "/hop2": hs.redirect("/hop1"),
        "/hop1": hs.redirect("/redirected.jpg"),
        "/redirected.jpg": hs.body(REDIRECTED),
        "/loop": hs.redirect("/loop"),
        "/to-ftp": hs.redirect("ftp://127.0.0.1/x.png"),
        "/trickle.jpg": hs.trickle(0.1),
        "/stall.jpg": hs.stall,
        "/reset.jpg": hs.reset,
        "/lying.png": hs.lying_length(images.rgb_png(14)[:100], 5000),
        "/html-as-jpeg.jpg": hs.body(images.HTML, "image/jpeg"),
        "/text.jpg": hs.body(b"just some words\n", "image/jpeg"),
        "/truncated.jpg": hs.body(images.truncated_jpeg(15)),
        "/zero.jpg": hs.body(b""),
        "/bomb.png": hs.body(images.png_header_only(30000, 30000), "image/png"),
        "/too-many-pixels.png": hs.body(images.png_header_only(8000, 6000), "image/png"),
        "/tiny.png": hs.body(images.rgb_png(16, size=(10, 40)), "image/png"),
        "/drawing.svg": hs.body(images.SVG, "image/svg+xml"),
        "/declared-huge.jpg": hs.declared_huge,
        "/unannounced-huge.jpg": hs.unannounced(1_000_000),
    })
    return table


EXPECTED_DROPS = {
    "/dup-b.png": "duplicate",
    "/conflict-cat.png": "label_conflict",
    "/conflict-dog.png": "label_conflict",
    "/always-500.png": "http_error",
    "/forbidden.png": "http_error",
    "/missing.png": "not_found",
    "/loop": "too_many_redirects",
    "/to-ftp": "unsupported_scheme",
    "/trickle.jpg": "timeout",
    "/stall.jpg": "timeout",
    "/reset.jpg": "connection_error",
    "/lying.png": "connection_error",
    "/html-as-jpeg.jpg": "not_an_image",
    "/text.jpg": "not_an_image",
    "/truncated.jpg": "decode_error",
    "/zero.jpg": "empty",
    "/bomb.png": "too_many_pixels",
    "/too-many-pixels.png": "too_many_pixels",
    "/tiny.png": "too_small",
    "/drawing.svg": "not_an_image",
    "/declared-huge.jpg": "too_large",
    "/unannounced-huge.jpg": "too_large",
}
EXPECTED_KEPT = {**KEEP, "/flaky.png": FLAKY, "/limited.png": LIMITED, "/hop3": REDIRECTED}


def label_of(path: str) -> str:
    return "dog" if path == "/conflict-dog.png" else "cat"


@pytest.fixture
def server():
    with hs.Server() as srv:
        srv.routes.update(routes())
        yield srv


def write_manifest(folder: Path, server: hs.Server, paths: list[str]) -> Path:
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "label", "note"])
        for path in paths:
            writer.writerow([server.url(path), label_of(path), "ignored column"])
    return manifest


def run_stage(tmp_path: Path, manifest: Path, out: str = "out", cache: str = "cache", processes: int = 1,
              *flags: str) -> dict:
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    report = tmp_path / out / "report" / "metrics.json"
    download.main([
        "--params", str(params), "--manifest", str(manifest), "--out", str(tmp_path / out / "images"),
        "--report", str(report), "--cache-dir", str(tmp_path / cache), "--log", str(tmp_path / "log"),
        "--processes", str(processes), *flags,
    ])
    return json.loads(report.read_text())


def rejected_reasons(tmp_path: Path, out: str, server: hs.Server) -> dict[str, str]:
    with (tmp_path / out / "report" / "rejected.csv").open() as handle:
        return {row["url"].removeprefix(server.base): row["reason"] for row in csv.DictReader(handle)}


tree = folder_bytes


@pytest.mark.parametrize("processes", [1, 2])
def test_every_failure_is_dropped_with_its_reason_and_every_image_kept(tmp_path, server, processes):
    paths = sorted(set(EXPECTED_KEPT) | set(EXPECTED_DROPS))
    manifest = write_manifest(tmp_path, server, paths)

    started = time.monotonic()
    report = run_stage(tmp_path, manifest, processes=processes)
    elapsed = time.monotonic() - started

    # The trickling and stalled servers cost at most one deadline (2.5 s), running in parallel
    # with the Retry-After wait; nothing may hang for the server's 60 s.
    assert elapsed < 8, f"stage took {elapsed:.1f} s"

    expected_files = {
        f"cat/{hashlib.sha256(data).hexdigest()}.{path.rsplit('.', 1)[-1].replace('jpeg', 'jpg')}"
        for path, data in EXPECTED_KEPT.items()
        if path != "/hop3"
    } | {f"cat/{hashlib.sha256(REDIRECTED).hexdigest()}.jpg"}
    assert set(kept_images(tmp_path / "out" / "images")) == expected_files
    for name, data in kept_images(tmp_path / "out" / "images").items():
        assert hashlib.sha256(data).hexdigest() == Path(name).stem

    assert rejected_reasons(tmp_path, "out", server) == EXPECTED_DROPS
    assert report["kept"] == len(EXPECTED_KEPT)
    assert report["dropped"] == len(EXPECTED_DROPS)
    assert report["total"] == len(paths)
    assert report["kept_per_class"] == {"cat": len(EXPECTED_KEPT), "dog": 0}
    assert report["bytes"] == sum(len(d) for d in EXPECTED_KEPT.values())

    # Retries: once for 500-then-200, twice more for a server that always fails or resets,
    # and the 429's Retry-After of 1 s was waited for before asking again.
    assert server.hits["/flaky.png"] == 2
    assert server.hits["/always-500.png"] == 3
    assert server.hits["/reset.jpg"] == 3
    assert server.hits["/forbidden.png"] == 1
    assert server.hits["/trickle.jpg"] == 1
    assert server.hits["/stall.jpg"] == 1
    first, second = server.times["/limited.png"]
    assert second - first >= 0.95


def test_second_run_is_byte_identical_and_fetches_nothing_kept_again(tmp_path, server):
    paths = ["/rgb.png", "/photo.jpg", "/dup-a.png", "/dup-b.png", "/flaky.png", "/text.jpg", "/missing.png"]
    manifest = write_manifest(tmp_path, server, paths)
    run_stage(tmp_path, manifest, out="first")
    hits_after_first = dict(server.hits)
    run_stage(tmp_path, manifest, out="second", processes=2)

    assert tree(tmp_path / "first") == tree(tmp_path / "second")
    for path in ["/rgb.png", "/photo.jpg", "/dup-a.png", "/dup-b.png", "/flaky.png"]:
        assert server.hits[path] == hits_after_first[path], f"{path} was fetched again"
    # Drops are not cached: a broken link may be fixed by the next run.
    assert server.hits["/text.jpg"] == hits_after_first["/text.jpg"] + 1


def test_a_fresh_cache_gives_the_same_bytes(tmp_path, server):
    paths = ["/rgb.png", "/cmyk.jpg", "/conflict-cat.png", "/conflict-dog.png", "/zero.jpg"]
    manifest = write_manifest(tmp_path, server, paths)
    run_stage(tmp_path, manifest, out="first", cache="cache1")
    run_stage(tmp_path, manifest, out="second", cache="cache2")
    assert tree(tmp_path / "first") == tree(tmp_path / "second")


def test_output_does_not_depend_on_manifest_order_of_unrelated_rows(tmp_path, server):
    paths = ["/rgb.png", "/photo.jpg", "/gray.png", "/text.jpg"]
    run_stage(tmp_path, write_manifest(tmp_path, server, paths), out="forward")
    run_stage(tmp_path, write_manifest(tmp_path, server, paths[::-1]), out="backward")
    assert tree(tmp_path / "forward") == tree(tmp_path / "backward")


@pytest.mark.parametrize(("fetches", "processes"), [(3, 1), (2, 2)])
def test_never_more_downloads_at_once_than_fetches_per_core_times_cores(tmp_path, server, fetches, processes):
    paths = [f"/slow-{i}.png" for i in range(16)]
    server.routes.update({path: hs.slow(images.rgb_png(100 + i), 0.15) for i, path in enumerate(paths)})
    report = run_stage(tmp_path, write_manifest(tmp_path, server, paths), "out", "cache", processes,
                       "--fetches-per-core", str(fetches), "--rows-per-task", "4")
    assert report["kept"] == len(paths)
    assert server.peak_active == fetches * processes
