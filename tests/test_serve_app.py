"""The prediction service on a real uvicorn on loopback: answers, batching, metrics and every kind
of bad input (always a 4xx/503 JSON error, never a 500)."""

from __future__ import annotations

import base64
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serve.app import Settings, create_app
from serve.bundle import Bundle
from serve.remote import RemotePolicy
from serve.running import running
from tests import images
from tests.serving import error


@pytest.fixture(scope="module")
def served(bundles, tmp_path_factory):
    """The service on the 'cam' bundle, with a served folder for {"path": ...}."""
    root = tmp_path_factory.mktemp("served")
    (root / "cat.png").write_bytes(images.rgb_png(1, size=(60, 40)))
    settings = Settings(bundle=bundles["cam"], max_body_bytes=200_000, max_pixels=100_000, max_wait_ms=20,
                        path_root=root, remote=RemotePolicy.from_cidrs(True, ["127.0.0.1/32"]))
    app = create_app(settings)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, app, root


def png(seed: int = 0, size: tuple[int, int] = (48, 40)) -> bytes:
    return images.rgb_png(seed, size=size)


def test_health_ready_and_metadata(served):
    client, app, _ = served
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    meta = client.get("/metadata").json()
    assert meta["labels"] == ["cat", "dog", "owl"] and meta["input_size"] == 32
    assert meta["name"] == "cam" and meta["class_activation_maps"] is True
    written = json.loads((app.state.bundle.folder / "metadata.json").read_text())
    assert meta["version"] == written["version"]
    # The export's metrics, val and the held-out test split apart, and the baseline guard's verdict.
    metrics = meta["metrics"]
    assert set(metrics) == {"val", "test", "beats_baseline", "baseline_margin"}
    for split in ("val", "test"):
        assert metrics[split] == {key: written["metrics"][split][key]
                                  for key in ("accuracy", "macro_f1", "baseline_macro_f1")}
    assert metrics["beats_baseline"] is written["metrics"]["beats_baseline"]
    assert metrics["baseline_margin"] == written["metrics"]["baseline_margin"]


def test_a_bundle_without_val_and_test_metrics_does_not_start(bundles, tmp_path):
    import shutil

    from serve.bundle import BundleError

    folder = tmp_path / "old"
    shutil.copytree(bundles["cam"], folder)
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["metrics"] = {"accuracy": 0.9, "macro_f1": 0.9}  # the flat layout before the test split
    (folder / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(BundleError, match=r"metadata.json: metrics.val: .*re-export the model") as raised:
        create_app(Settings(bundle=folder))
    assert "\n" not in str(raised.value)

    # A bundle that was never evaluated (the benchmark's untrained model) serves, with no metrics.
    metadata["metrics"] = {}
    (folder / "metadata.json").write_text(json.dumps(metadata))
    with running(create_app(Settings(bundle=folder))) as url:
        assert httpx.get(url + "/metadata").json()["metrics"] is None


def test_every_input_kind_gives_onnx_runtimes_probabilities(served):
    client, app, root = served
    bundle: Bundle = app.state.bundle
    data = (root / "cat.png").read_bytes()
    pixels, _ = bundle.preprocess(data)
    expected, _ = bundle.predict(pixels[None])
    answers = [client.post("/predict", files={"image": ("cat.png", data, "image/png")}),
               client.post("/predict", json={"image_base64": base64.b64encode(data).decode()}),
               client.post("/predict", json={"path": "cat.png"})]
    for response in answers:
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == {"name": "cam", "version": bundle.version}
        assert [body["scores"][label] for label in bundle.labels] == expected[0].tolist()  # same bytes, same floats
        assert body["label"] == bundle.labels[int(np.argmax(expected[0]))]
        assert body["confidence"] == float(expected[0].max())
    top = client.post("/predict", params={"top_k": 2}, files={"image": ("cat.png", data, "image/png")}).json()
    assert len(top["scores"]) == 2 and top["label"] in top["scores"]
    assert len(client.post("/predict", json={"path": "cat.png", "top_k": 1}).json()["scores"]) == 1


def test_batch_answers_each_image_in_order_and_a_bad_one_alone(served):
    client, app, _ = served
    files = [("images", ("a.png", png(1), "image/png")), ("images", ("b.txt", b"not an image", "text/plain")),
             ("images", ("c.png", png(2), "image/png"))]
    results = client.post("/predict/batch", files=files).json()["results"]
    assert len(results) == 3
    assert results[1] == {"error": {"code": "not_an_image",
                                    "message": "images[1]: the bytes are not an image Pillow can read"}}
    for result, seed in ((results[0], 1), (results[2], 2)):
        pixels, _ = app.state.bundle.preprocess(png(seed))
        assert result["label"] == app.state.bundle.labels[int(np.argmax(app.state.bundle.predict(pixels[None])[0]))]
    error(client.post("/predict/batch", files={"other": ("a.png", png(), "image/png")}), 422, "missing_field")
    error(client.post("/predict/batch", json={"image_base64": ""}), 415, "unsupported_media")


def test_annotate_draws_on_the_original_size(served, bundles):
    client, _, _ = served
    data = png(3, size=(90, 50))
    response = client.post("/annotate", files={"image": ("x.png", data, "image/png")})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    annotated = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    original = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert annotated.shape == original.shape
    assert (annotated != original).any(axis=2).mean() > 0.2  # the heatmap covers the image, not a corner
    assert (annotated == [255, 0, 0]).all(axis=2).any()  # the box


@pytest.mark.parametrize(("kwargs", "status", "code"), [
    ({"content": b"x" * 300_000, "headers": {"content-type": "application/json"}}, 413, "too_large"),
    ({"files": {"image": ("big.png", images.encode(Image.new("RGB", (400, 400)), "PNG"), "image/png")}}, 422,
     "too_many_pixels"),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media"),
    ({"content": b"hello"}, 415, "unsupported_media"),
    ({"files": {"image": ("x.ico", images.encode(images.noise(16, 16), "ICO"), "image/x-icon")}}, 415,
     "unsupported_media"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "malformed_json"),
    ({"json": {"image_base64": "***"}}, 422, "malformed_base64"),
    ({"json": {"image_base64": base64.b64encode(b"plain text").decode()}}, 422, "not_an_image"),
    ({"json": {"image_base64": ""}}, 422, "not_an_image"),
    ({"files": {"image": ("x.png", png()[:60], "image/png")}}, 422, "not_an_image"),
    ({"json": {}}, 422, "missing_field"),
    ({"json": {"image_base64": "aGk=", "path": "cat.png"}}, 422, "missing_field"),
    ({"json": {"picture": "aGk="}}, 422, "invalid_field"),
    ({"json": ["image_base64"]}, 422, "invalid_field"),
    ({"json": {"path": "cat.png", "top_k": 0}}, 422, "invalid_field"),
    ({"files": {"photo": ("x.png", png(), "image/png")}}, 422, "missing_field"),
    ({"data": {"image": "just text"}}, 415, "unsupported_media"),
    ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 422,
     "missing_field"),
])
def test_bad_input_is_a_named_4xx_json_error(served, kwargs, status, code):
    client, _, _ = served
    message = error(client.post("/predict", **kwargs), status, code)
    assert message


def test_query_and_route_errors_are_json_too(served):
    client, _, _ = served
    error(client.post("/predict", params={"top_k": "many"}, json={"path": "cat.png"}), 422, "invalid_field")
    error(client.get("/nowhere"), 404, "not_found")
    error(client.get("/predict"), 405, "method_not_allowed")


def test_streamed_body_over_the_limit_is_413_without_content_length(served):
    client, _, _ = served

    def chunks():
        for _ in range(40):
            yield b"x" * 10_000

    error(client.post("/predict", content=chunks(), headers={"content-type": "application/json"}), 413, "too_large")


def test_32_concurrent_clients_get_no_errors_and_share_batches(served):
    client, app, _ = served
    bodies = [png(seed) for seed in range(8)]
    expected = {}
    for seed, data in enumerate(bodies):
        pixels, _ = app.state.bundle.preprocess(data)
        expected[seed] = app.state.bundle.predict(pixels[None])[0][0]

    def send(i: int) -> tuple[int, int, dict]:
        response = client.post("/predict", files={"image": ("x.png", bodies[i % 8], "image/png")})
        return i, response.status_code, response.json()

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(send, range(320)))
    assert [status for _, status, _ in answers] == [200] * 320
    for i, _, body in answers:  # batched with others, still the same answer (to float32 rounding)
        scores = [body["scores"][label] for label in app.state.bundle.labels]
        np.testing.assert_allclose(scores, expected[i % 8], atol=1e-6)
    text = client.get("/metrics").text
    single = float(re.search(r'inference_batch_size_bucket\{le="1.0"\} (\S+)', text).group(1))
    total = float(re.search(r"inference_batch_size_count (\S+)", text).group(1))
    assert total > 0 and single < total, "no batch held more than one image"
    assert re.search(r'http_requests_total\{route="/predict",status="200"\} (\d+)', text)
    assert "inference_queue_depth" in text and "http_request_duration_seconds_bucket" in text


def test_a_full_queue_answers_503_with_retry_after(bundles):
    app = create_app(Settings(bundle=bundles["cam"], max_queue=1, max_batch=1, max_wait_ms=0))
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        def send(_: int) -> httpx.Response:
            return client.post("/predict", files={"image": ("x.png", png(), "image/png")})

        with ThreadPoolExecutor(32) as pool:
            responses = list(pool.map(send, range(96)))
    statuses = {response.status_code for response in responses}
    assert statuses <= {200, 503} and 200 in statuses and 503 in statuses
    refused = next(response for response in responses if response.status_code == 503)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "overloaded"


def test_path_input_stays_inside_its_root(served, tmp_path_factory):
    client, _, root = served
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(png(9))
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "inside.png").symlink_to(root / "cat.png")
    for path in ("../" + outside.name + "/secret.png", str(outside / "secret.png"), "escape.png",
                 "sub/../../" + outside.name + "/secret.png", "/etc/passwd"):
        error(client.post("/predict", json={"path": path}), 403, "path_refused")
    assert client.post("/predict", json={"path": "sub/inside.png"}).status_code == 200  # a link that stays inside
    error(client.post("/predict", json={"path": "missing.png"}), 404, "not_found")
    error(client.post("/predict", json={"path": "sub"}), 422, "bad_path")
    error(client.post("/predict", json={"path": "cat.png\x00.txt"}), 422, "bad_path")


def test_int8_variant_answers_with_the_quantized_graphs_probabilities(records, tmp_path):
    import onnxruntime as ort

    from tests.conftest import export_bundle, small_cnn

    folder = export_bundle(small_cnn(32, 3, "avg"), records[3], tmp_path, "cam", "--quantize")
    data = png(4)
    with running(create_app(Settings(bundle=folder, precision="int8"))) as url, httpx.Client(base_url=url) as client:
        assert client.get("/metadata").json()["precision"] == "int8"
        response = client.post("/predict", files={"image": ("x.png", data, "image/png")})
    assert response.status_code == 200, response.text
    fp32 = Bundle.load(folder)
    pixels, _ = fp32.preprocess(data)
    int8 = ort.InferenceSession(str(folder / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    expected = int8.run(["probabilities"], {"image": pixels[None].astype(np.float32)})[0][0]
    answered = np.array([response.json()["scores"][label] for label in fp32.labels])
    np.testing.assert_allclose(answered, expected, atol=1e-6)
    assert not np.allclose(answered, fp32.predict(pixels[None])[0][0], atol=1e-6)  # really the INT8 graph


def test_path_and_url_are_off_unless_switched_on(bundles):
    with running(create_app(Settings(bundle=bundles["cam"]))) as url:
        error(httpx.post(url + "/predict", json={"path": "cat.png"}), 403, "path_disabled")
        error(httpx.post(url + "/predict", json={"url": "http://127.0.0.1/x.png"}), 403, "remote_disabled")


def test_openapi_documents_the_endpoints(served):
    client, _, _ = served
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/predict/batch", "/annotate", "/metadata", "/healthz", "/readyz", "/metrics"} <= set(
        schema["paths"])
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    model_metrics = schema["components"]["schemas"]["ModelMetrics"]["properties"]
    assert {"val", "test", "beats_baseline", "baseline_margin"} == set(model_metrics)
    assert "held-out" in model_metrics["test"]["description"]


def test_schemathesis_finds_no_server_errors_or_schema_violations(served, tmp_path):
    """Property-based requests from the service's own OpenAPI schema, against the live server."""
    import subprocess
    import sys

    client, _, _ = served
    base = str(client.base_url)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", f"{base}/openapi.json", "--checks", "all",
         "--max-examples", "25", "--seed", "1", "--no-color", "--exclude-checks", "positive_data_acceptance"],
        capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
