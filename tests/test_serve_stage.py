"""stages.serve (choice of model, Triton repository, the HTTP check), tools.release and
serve.predict_folder."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from imgpipe.bundle import BUNDLE_SETTINGS
from imgpipe.cli import StageError
from serve import predict_folder
from serve.bundle import Bundle
from serve.settings import resolve
from stages import serve as serve_stage
from tests import images
from tools import release

REPO = Path(__file__).resolve().parent.parent


def verdicts(root: Path, bundles: dict[str, Path], val_f1: dict[str, float], beats: dict[str, bool]) -> Path:
    """Two bundles named like the pipeline's, with the val macro-F1 and baseline verdict given.

    The bundles' small models are untrained, so their own verdicts say little: the choice is
    tested on metadata set here (the HTTP check compares accuracy, which stays the bundle's)."""
    for name, source in (("resnet50v2", "cam"), ("autokeras", "flat")):
        shutil.copytree(bundles[source], root / name)
        path = root / name / "metadata.json"
        metadata = json.loads(path.read_text())
        metadata["metrics"]["val"]["macro_f1"] = val_f1[name]
        metadata["metrics"]["beats_baseline"] = beats[name]
        path.write_text(json.dumps(metadata, indent=2) + "\n")
    return root


@pytest.fixture(scope="module")
def exported(bundles, tmp_path_factory) -> Path:
    """Both beat the baseline; resnet50v2 has the higher val macro-F1."""
    return verdicts(tmp_path_factory.mktemp("exported"), bundles, {"resnet50v2": 0.8, "autokeras": 0.7},
                    {"resnet50v2": True, "autokeras": True})


def run_serve(tmp_path: Path, exported: Path, records: Path, *flags: str) -> dict:
    params = tmp_path / "params.yaml"
    tmp_path.mkdir(exist_ok=True)
    params.write_text("serve:\n  max_batch: 4\n")
    serve_stage.main(["--params", str(params), "--bundles", str(exported), "--records", str(records),
                      "--out", str(tmp_path / "serving"), "--triton", str(tmp_path / "triton"),
                      "--reports", str(tmp_path / "reports"), "--timings", str(tmp_path / "timings.json"), *flags])
    return json.loads((tmp_path / "reports" / "metrics.json").read_text())


def test_serve_picks_the_best_model_writes_triton_and_checks_http(tmp_path, exported, records):
    best = "resnet50v2"
    metrics = run_serve(tmp_path, exported, records[3])
    assert metrics["model"] == best and metrics["beats_baseline"]
    pack = json.loads((records[3].parent / "pack3.json").read_text())["images"]
    for split in ("val", "test"):  # every image of both held-out splits went over HTTP
        assert metrics["images"][split] == pack[split] > 0
        assert metrics["http_accuracy"][split] == pytest.approx(metrics["offline_accuracy"][split], abs=1e-6)
    assert metrics["agreement_with_onnxruntime"] == 1.0 and metrics["max_abs_diff_onnxruntime"] <= 1e-5
    assert (tmp_path / "serving" / "model.onnx").read_bytes() == (exported / best / "model.onnx").read_bytes()
    # The settings the check ran with are in the bundle: `python -m serve` starts with them.
    written = json.loads((tmp_path / "serving" / "settings.json").read_text())
    assert written["max_batch"] == 4 and set(written) == set(BUNDLE_SETTINGS)
    assert resolve(tmp_path / "serving").max_batch == 4 and resolve(tmp_path / "serving", max_batch=2).max_batch == 2
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert timings["images_per_second"] > 0 and timings["p99_ms"] >= timings["p50_ms"] > 0

    # The Triton repository, read back with Triton's own schema.
    config = text_format.Parse((tmp_path / "triton" / best / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert config.name == best and config.backend == "onnxruntime" and config.max_batch_size == 4
    assert [(i.name, list(i.dims), i.data_type) for i in config.input] == [("image", [32, 32, 3],
                                                                            model_config_pb2.TYPE_FP32)]
    assert config.output[0].name == "probabilities" and list(config.output[0].dims) == [3]
    assert list(config.dynamic_batching.preferred_batch_size) == [4]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    model_file = tmp_path / "triton" / best / "1" / "model.onnx"
    assert model_file.read_bytes() == (exported / best / "model.onnx").read_bytes()
    labels = (tmp_path / "triton" / best / config.output[0].label_filename).read_text().split()
    assert labels == ["cat", "dog", "owl"]


def test_serve_model_can_be_named_and_a_missing_one_is_an_error(tmp_path, exported, records):
    metrics = run_serve(tmp_path, exported, records[3], "--model", "resnet50v2")
    assert metrics["model"] == "resnet50v2"
    config = text_format.Parse((tmp_path / "triton" / "resnet50v2" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert [output.name for output in config.output] == ["probabilities", "features"]
    only_one = tmp_path / "only"
    shutil.copytree(exported / "resnet50v2", only_one / "resnet50v2")
    with pytest.raises(StageError, match="no bundle 'autokeras'"):
        run_serve(tmp_path, only_one, records[3], "--model", "autokeras")


def test_best_never_picks_a_model_below_the_baseline_and_none_is_a_one_line_failure(tmp_path, bundles, records):
    # The higher val macro-F1 does not count when the model is no better than chance.
    guarded = verdicts(tmp_path / "guarded", bundles, {"resnet50v2": 0.9, "autokeras": 0.7},
                       {"resnet50v2": False, "autokeras": True})
    assert run_serve(tmp_path / "one", guarded, records[3])["model"] == "autokeras"
    # Named explicitly, such a model is served, with a warning in the summary.
    named = run_serve(tmp_path / "two", guarded, records[3], "--model", "resnet50v2")
    assert named["model"] == "resnet50v2" and not named["beats_baseline"]

    hopeless = verdicts(tmp_path / "hopeless", bundles, {"resnet50v2": 0.3, "autokeras": 0.2},
                        {"resnet50v2": False, "autokeras": False})
    (tmp_path / "params.yaml").write_text("serve:\n  max_batch: 4\n")
    result = subprocess.run([sys.executable, "-m", "stages.serve", "--params", str(tmp_path / "params.yaml"),
                             "--bundles", str(hopeless), "--records", str(records[3]), "--out", str(tmp_path / "out"),
                             "--triton", str(tmp_path / "triton"), "--reports", str(tmp_path / "reports")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "no model beats the weighted random guess" in line and "autokeras 0.200" in line
    assert "reports/train_*/metrics.json" in line
    assert not (tmp_path / "out").exists()

    # A bundle exported before the val/test split: one line naming its file, not a KeyError.
    stale = hopeless / "autokeras" / "metadata.json"
    metadata = json.loads(stale.read_text())
    metadata["metrics"] = {"accuracy": 0.9, "macro_f1": 0.9}
    stale.write_text(json.dumps(metadata))
    with pytest.raises(StageError, match=f"{stale}: metrics lack val, test"):
        run_serve(tmp_path / "three", hopeless, records[3])


def test_release_copies_the_bundle_and_dvc_adds_it(tmp_path, bundles, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=repo, check=True, capture_output=True)
    shutil.copytree(bundles["cam"], repo / "build" / "serving")
    monkeypatch.chdir(repo)
    release.main([])
    assert sorted(p.name for p in (repo / "model").iterdir()) == sorted(p.name for p in bundles["cam"].iterdir())
    first = (repo / "model.dvc").read_text()
    assert "path: model" in first
    release.main([])  # releasing the same bundle again changes nothing
    assert (repo / "model.dvc").read_text() == first
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "model.dvc"], cwd=repo, capture_output=True,
                            text=True, check=True)
    assert "up to date" in status.stdout
    assert Bundle.load(repo / "model").labels == ["cat", "dog", "owl"]


def test_release_without_a_bundle_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.release", "--bundle", str(tmp_path / "none")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1 and "not a serving bundle" in result.stderr and "Traceback" not in result.stderr


def test_predict_folder_lists_every_file_with_a_label_or_a_reason(tmp_path, bundles):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(images.rgb_png(1))
    (folder / "sub" / "b.jpg").write_bytes(images.rgb_jpeg(2))
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(images.rgb_png(3)[:50])
    out = tmp_path / "predictions.csv"
    assert predict_folder.main([str(folder), "--bundle", str(bundles["cam"]), "--out", str(out),
                                "--batch-size", "2"]) == 0
    rows = {row["path"]: row for row in csv.DictReader(out.open())}
    assert sorted(rows) == ["a.png", "broken.png", "notes.txt", "sub/b.jpg"]
    assert rows["notes.txt"]["error"] == "not_an_image" and rows["broken.png"]["error"] == "not_an_image"
    bundle = Bundle.load(bundles["cam"])
    pixels, _ = bundle.preprocess(images.rgb_png(1))
    probabilities = bundle.predict(pixels[None])[0][0]
    assert rows["a.png"]["label"] == bundle.labels[int(probabilities.argmax())]
    assert float(rows["a.png"]["confidence"]) == pytest.approx(float(probabilities.max()), abs=1e-6)
    assert predict_folder.main([str(tmp_path / "nowhere"), "--bundle", str(bundles["cam"])]) == 2
    assert predict_folder.main([str(folder), "--bundle", str(tmp_path)]) == 2
    assert predict_folder.main([str(folder), "--bundle", str(bundles["cam"]), "--precision", "int8"]) == 2
    with pytest.raises(SystemExit) as refused:  # argparse's usage error
        predict_folder.main([str(folder), "--batch-size", "0"])
    assert refused.value.code == 2


def test_service_cli_refuses_a_missing_bundle_or_bad_switches_in_one_line(tmp_path, bundles):
    bad_settings = tmp_path / "bad-settings"
    shutil.copytree(bundles["cam"], bad_settings)
    (bad_settings / "settings.json").write_text('{"max_batch": 0}')
    (tmp_path / "short-keys").write_text("# a comment\nshort\n")
    cam = str(bundles["cam"])
    for flags, expected in ((["--bundle", str(bad_settings)], "settings.json: max_batch: Input should be greater"),
                            (["--bundle", cam, "--api-key-file", str(tmp_path / "none")],
                             f"--api-key-file {tmp_path / 'none'}: cannot be read"),
                            (["--bundle", cam, "--api-key-file", str(tmp_path / "short-keys")],
                             "key 1 is shorter than 16 characters"),
                            (["--bundle", str(tmp_path)], "not a serving bundle"),
                            (["--bundle", str(bundles["cam"]), "--precision", "int8"], "has no int8 variant"),
                            (["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
                            (["--bundle", str(tmp_path), "--remote-allow-cidr", "nonsense"], "--remote-allow-cidr"),
                            (["--workers", "0"], "argument --workers: 0 is below 1"),
                            (["--max-batch", "two"], "argument --max-batch: 'two' is not an integer"),
                            (["--max-wait-ms", "-1"], "argument --max-wait-ms: -1 is below 0")):
        result = subprocess.run([sys.executable, "-m", "serve", *flags], capture_output=True, text=True, cwd=REPO,
                                timeout=60)
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr
