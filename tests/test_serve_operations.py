"""What an operator relies on, on a real uvicorn on loopback: settings from the bundle with flags
over them, API keys, one JSON log line per request with its id, readiness while draining, and a
hot reload under load that fails no request and keeps the old model when the new one is broken."""

from __future__ import annotations

import json
import logging
import shutil
import threading

import httpx
import pytest

from serve.access_log import HEADER
from serve.app import create_app
from serve.auth import load_keys
from serve.running import running
from serve.settings import Settings, resolve
from tests import images
from tests.serving import Load, copy_bundle, error, image_file

KEY = "k3y-for-tests-0123456789abcdef"


def test_settings_come_from_the_bundle_and_flags_override_them(bundles, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(bundles["cam"], folder)
    (folder / "settings.json").write_text(json.dumps({"max_batch": 3, "max_queue": 7, "max_pixels": 5000}))
    settings = resolve(folder, max_queue=9, max_pixels=None)  # None: the flag was not given
    assert (settings.max_batch, settings.max_queue, settings.max_pixels) == (3, 9, 5000)
    with running(create_app(settings)) as url:
        shown = httpx.get(url + "/metadata").json()["settings"]
        big = images.rgb_png(0, size=(100, 60))  # 6000 pixels: over the bundle's limit
        refused = httpx.post(url + "/predict", files={"image": ("big.png", big, "image/png")})
    assert (shown["max_batch"], shown["max_queue"], shown["max_pixels"]) == (3, 9, 5000)
    assert shown["keys_required"] is False and shown["remote_urls"] is False
    error(refused, 422, "too_many_pixels")
    for bad, named in (({"max_batch": 0}, "max_batch"), ({"batch": 3}, "batch"), ("[1]", "settings")):
        (folder / "settings.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
        with pytest.raises(ValueError, match=f"settings.json: {named}"):
            resolve(folder)


def test_keys_guard_every_route_but_the_probes_and_the_page(bundles, tmp_path, caplog):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# operators\n{KEY}\n\nsecond-key-0123456789abcdef\n")
    assert load_keys(keys) == (KEY, "second-key-0123456789abcdef")
    caplog.set_level(logging.INFO, logger="serve.access")
    with running(create_app(resolve(bundles["cam"], api_key_file=keys))) as url, httpx.Client(base_url=url) as client:
        for path in ("/healthz", "/readyz", "/"):
            assert client.get(path).status_code == 200, path
        for method, path in (("GET", "/metadata"), ("GET", "/metrics"), ("GET", "/openapi.json"),
                             ("POST", "/predict"), ("POST", "/annotate"), ("POST", "/admin/reload")):
            refused = client.request(method, path)
            assert refused.headers["www-authenticate"] == "Bearer", path
            error(refused, 401, "unauthorized")
        wrong = client.post("/predict", files=image_file(), headers={"Authorization": "Bearer " + KEY[:-1] + "X"})
        assert "not valid" in error(wrong, 401, "unauthorized")
        basic = client.get("/metadata", headers={"Authorization": "Basic " + KEY})
        error(basic, 401, "unauthorized")
        good = {"Authorization": f"Bearer {KEY}"}
        assert client.post("/predict", files=image_file(), headers=good).status_code == 200
        assert client.get("/metadata", headers=good).json()["settings"]["keys_required"] is True
        metrics = client.get("/metrics", headers=good).text
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert '"status": 401' in logged and '"status": 200' in logged
    assert KEY not in logged and KEY[:8] not in metrics  # keys never reach the logs or the metrics


def test_each_request_is_one_json_line_with_the_id_it_echoes(bundles, caplog):
    caplog.set_level(logging.INFO, logger="serve.access")
    with running(create_app(Settings(bundle=bundles["cam"]))) as url, httpx.Client(base_url=url) as client:
        mine = client.post("/predict", files=image_file(), headers={HEADER: "trace-42.a"})
        spoofed = client.get("/healthz", headers={HEADER: 'x" , "status": 200'})  # not well-formed: replaced
        batch = client.post("/predict/batch", files=[("images", ("a.png", images.rgb_png(i), "image/png"))
                                                     for i in range(3)])
        version = client.get("/metadata").json()["version"]
    assert mine.headers[HEADER] == "trace-42.a"
    assert spoofed.headers[HEADER] != 'x" , "status": 200' and len(spoofed.headers[HEADER]) == 32
    lines = {line["request_id"]: line for line in (json.loads(r.getMessage()) for r in caplog.records)
             if "request_id" in line}
    assert set(lines) >= {"trace-42.a", spoofed.headers[HEADER], batch.headers[HEADER]}
    line = lines["trace-42.a"]
    assert set(line) == {"time", "request_id", "method", "route", "status", "latency_ms", "batch_sizes",
                         "model_version"}
    assert (line["method"], line["route"], line["status"], line["model_version"]) == ("POST", "/predict", 200, version)
    assert line["batch_sizes"] == [1] and line["latency_ms"] > 0
    assert len(lines[batch.headers[HEADER]]["batch_sizes"]) == 3  # one entry per image, each its ONNX batch
    assert all(1 <= size <= 3 for size in lines[batch.headers[HEADER]]["batch_sizes"])
    assert lines[spoofed.headers[HEADER]]["batch_sizes"] == []


def test_readiness_fails_at_once_when_draining(bundles):
    service = create_app(Settings(bundle=bundles["cam"]))
    with running(service) as url:
        assert httpx.get(url + "/readyz").status_code == 200
        service.drain()
        error(httpx.get(url + "/readyz"), 503, "not_ready")
        assert httpx.get(url + "/healthz").status_code == 200
        assert httpx.post(url + "/predict", files=image_file()).status_code == 200  # accepted work is still done


def test_reload_switches_models_under_load_without_a_failed_request(bundles, tmp_path):
    live = tmp_path / "live"
    copy_bundle(bundles["cam"], live)
    versions = {name: json.loads((bundles[name] / "metadata.json").read_text())["version"] for name in ("cam", "flat")}
    assert versions["cam"] != versions["flat"]
    service = create_app(resolve(live), resolve=lambda: resolve(live))
    with running(service) as url, httpx.Client(base_url=url, timeout=60) as admin, Load(url) as load:
        while load.answered < 20:
            threading.Event().wait(0.05)
        copy_bundle(bundles["flat"], live)  # what `dvc pull model.dvc` does to model/
        reloaded = admin.post("/admin/reload").json()
        assert reloaded == {"status": "reloaded", "name": "flat", "version": versions["flat"],
                            "previous_version": versions["cam"]}
        seen = load.answered
        while load.answered < seen + 20:
            threading.Event().wait(0.05)
        (live / "model.onnx").write_bytes(b"not a model")  # a broken pull: the old model goes on serving
        message = error(admin.post("/admin/reload"), 409, "reload_failed")
        assert "model.onnx" in message and f"flat {versions['flat']} goes on serving" in message
        seen = load.answered
        while load.answered < seen + 20:
            threading.Event().wait(0.05)
        assert admin.get("/metadata").json()["version"] == versions["flat"]
    assert load.failures == []
    assert load.versions == {versions["cam"], versions["flat"]}
