"""A serving host without TensorFlow: the two install lines of docs/service.md (requirements-serve.lock, then the
project with its [serve] extra) in a fresh virtual environment made from a copy of the checkout,
then `python -m serve` and `python -m serve.predict_folder` from that environment on a real bundle,
over real HTTP on loopback. Nothing is mocked; pip installs from the package index (its cache)."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serve.annotate import annotate
from serve.bundle import Bundle
from serve.inputs import decode
from tests import images

ROOT = Path(__file__).resolve().parents[1]
PAGE = "docs/service.md"  # the documentation site's page on the service
SERVICE_PAGE = (ROOT / PAGE).read_text()
HEADING = "## Serving host without TensorFlow"
TRAINING_STACK = ("tensorflow", "keras", "tf_keras", "autokeras", "keras_tuner", "tf2onnx", "dvc", "torch")


def serving_host_block() -> list[str]:
    """The commands of the service page's serving-host ```sh block (comments dropped)."""
    assert HEADING in SERVICE_PAGE, f"{PAGE} has no {HEADING!r} part"
    block = re.search(r"```sh\n(.*?)```", SERVICE_PAGE[SERVICE_PAGE.index(HEADING):], re.S)
    assert block, f"{PAGE}: no ```sh block under {HEADING!r}"
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def install_commands() -> list[list[str]]:
    commands = [shlex.split(line) for line in serving_host_block() if line.startswith("python -m pip install")]
    assert len(commands) == 2, f"{PAGE}'s serving host install is not two pip lines: {serving_host_block()}"
    return commands


def checkout_copy(dest: Path) -> Path:
    """The files a clone would have (tracked and not ignored), as they are in this working tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not in a clone of it
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def venv_env(venv: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1")
    return env


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{shlex.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def lock_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[normalize(name)] = version
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """(python of the serving venv, environment, a folder outside any checkout) after the page's install."""
    root = tmp_path_factory.mktemp("serving-host")
    checkout = checkout_copy(root / "checkout")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, env = venv / "bin" / "python", venv_env(venv)
    for words in install_commands():
        run([str(python), *words[1:]], cwd=checkout, env=env, timeout=420)
    elsewhere = root / "elsewhere"  # not a checkout: imports come from the installed packages
    elsewhere.mkdir()
    return python, env, elsewhere


@pytest.mark.slow
def test_the_venv_holds_the_service_and_no_training_stack(host):
    python, env, elsewhere = host
    probe = ("import importlib.util, json, sys\n"
             "import serve, serve.__main__, serve.app, serve.annotate, serve.predict_folder\n"
             f"stack = {TRAINING_STACK!r}\n"
             "print(json.dumps({'installed': [m for m in stack if importlib.util.find_spec(m)],\n"
             "                  'imported': sorted(m for m in sys.modules if m.split('.')[0] in stack),\n"
             "                  'serve': serve.__file__, 'stages': bool(importlib.util.find_spec('stages'))}))")
    found = json.loads(run([str(python), "-c", probe], elsewhere, env))
    assert found["installed"] == [] and found["imported"] == [], found
    assert Path(found["serve"]).is_relative_to(python.parents[1] / "lib"), found  # the installed copy
    assert not found["stages"], "stages/ is run from the repository, not installed"
    run([str(python), "-m", "pip", "check"], elsewhere, env)
    # The lock is the whole environment: installing the project with [serve] added only the project.
    frozen = run([str(python), "-m", "pip", "freeze"], elsewhere, env)
    installed = {normalize(line.split("==")[0].split(" @ ")[0]) for line in frozen.splitlines()}
    assert installed == set(lock_pins(ROOT / "requirements-serve.lock")) | {"image-pipeline"}, installed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def service(host, bundles):
    """`python -m serve` of the serving venv on the cam bundle; yields (client, pid)."""
    python, env, elsewhere = host
    port = free_port()
    log = (elsewhere / "serve.log").open("w")
    process = subprocess.Popen([str(python), "-m", "serve", "--bundle", str(bundles["cam"]), "--host", "127.0.0.1",
                                "--port", str(port)], cwd=elsewhere, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 90
            while True:
                assert process.poll() is None, (elsewhere / "serve.log").read_text()
                assert time.monotonic() < deadline, "the service did not get ready:\n" + (
                    elsewhere / "serve.log").read_text()
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            yield client, process.pid
    finally:
        process.terminate()
        process.wait(30)
        log.close()


@pytest.mark.slow
def test_predict_answers_what_onnx_runtime_computes(service, bundles):
    client, _ = service
    bundle = Bundle.load(bundles["cam"])
    data = images.rgb_png(5, size=(60, 40))
    pixels, _ = bundle.preprocess(data)
    expected = bundle.predict(pixels[None])[0][0]
    for response in (client.post("/predict", files={"image": ("cat.png", data, "image/png")}),
                     client.post("/predict", json={"image_base64": base64.b64encode(data).decode()})):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == {"name": "cam", "version": bundle.version}
        np.testing.assert_allclose([body["scores"][label] for label in bundle.labels], expected, rtol=0, atol=1e-6)
        assert body["label"] == bundle.labels[int(np.argmax(expected))]
        assert body["confidence"] == max(body["scores"].values())


@pytest.mark.slow
def test_annotate_draws_what_the_service_code_draws_here(service, bundles):
    client, _ = service
    bundle = Bundle.load(bundles["cam"])
    data = images.rgb_png(6, size=(90, 50))
    response = client.post("/annotate", files={"image": ("x.png", data, "image/png")})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png", response.text
    original, pixels, geometry = decode(data, bundle.image_size, bundle.pad_color, bundle.resample, 10**6)
    probabilities, features = bundle.predict(pixels[None], with_features=True)
    best = int(np.argmax(probabilities[0]))
    expected = annotate(original, bundle.class_activation_map(features[0], best), geometry, bundle.image_size,
                        bundle.labels[best], float(probabilities[0][best]))
    got = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.int16)
    want = np.asarray(Image.open(io.BytesIO(expected)).convert("RGB"), dtype=np.int16)
    assert got.shape == want.shape == (50, 90, 3)
    assert np.abs(got - want).max() <= 1  # the same heatmap, box and label (floats from another process)
    assert (got == [255, 0, 0]).all(axis=2).any()  # the box


@pytest.mark.slow
def test_the_page_at_root_is_installed_with_the_service(service):
    client, _ = service
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.text
    assert 'src="page/page.js"' in page.text
    for asset, kind in (("page.js", "javascript"), ("page.css", "text/css"), ("icon.svg", "image/svg+xml")):
        response = client.get(f"/page/{asset}")
        assert response.status_code == 200 and kind in response.headers["content-type"], (asset, response.text)


@pytest.mark.slow
def test_the_running_service_never_loaded_tensorflow(service):
    _, pid = service
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "onnxruntime" in maps  # the check sees the server's shared objects
    assert not re.search(r"tensorflow|libtf|_pywrap_tf", maps)


@pytest.mark.slow
def test_predict_folder_runs_from_the_venv(host, bundles):
    python, env, elsewhere = host
    assert "--bundle" in run([str(python), "-m", "serve.predict_folder", "--help"], elsewhere, env)
    folder = elsewhere / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(images.rgb_png(7))
    (folder / "b.txt").write_bytes(b"not an image")
    run([str(python), "-m", "serve.predict_folder", str(folder), "--bundle", str(bundles["cam"]), "--out",
         str(elsewhere / "predictions.csv")], elsewhere, env)
    rows = list(csv.DictReader((elsewhere / "predictions.csv").open()))
    bundle = Bundle.load(bundles["cam"])
    pixels, _ = bundle.preprocess(images.rgb_png(7))
    assert rows[0]["path"] == "a.png" and rows[0]["label"] == bundle.labels[int(np.argmax(bundle.predict(
        pixels[None])[0][0]))]
    assert rows[1]["path"] == "b.txt" and rows[1]["label"] == "" and rows[1]["error"]


def test_the_serving_lock_is_the_pipeline_lock_s_versions_without_the_training_stack():
    serving, pipeline = lock_pins(ROOT / "requirements-serve.lock"), lock_pins(ROOT / "requirements.lock")
    assert {name: version for name, version in serving.items() if pipeline.get(name) != version} == {}
    assert not set(serving) & {"tensorflow", "keras", "autokeras", "dvc", "tf2onnx", "keras-tuner"}


def requirement_name(line: str) -> str:
    return normalize(re.split(r"[\s\[<>=~!;]", line.strip(), maxsplit=1)[0])


def test_pyproject_lists_requirements_in_s_direct_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    listed = {requirement_name(dep) for dep in [*project["dependencies"], *sum(extras.values(), [])]}
    lines = (re.sub(r"#.*$", "", line) for line in (ROOT / "requirements.in").read_text().splitlines())
    required = {requirement_name(line) for line in lines if line.strip()}
    assert listed - {"image-pipeline"} == required, {"pyproject.toml only": listed - required - {"image-pipeline"},
                                                     "requirements.in only": required - listed}
    assert {requirement_name(dep) for dep in extras["serve"]}.isdisjoint(map(normalize, TRAINING_STACK))
