"""The demo data and the DVC pipeline, run for real with DVC in a temporary copy of the repository."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline import copy_pipeline, dvc, tree, venv_env
from tests.shard_files import kept_images
from tools import demo_data

TINY = """\
pack:
  image_size: 32
train:
  resnet:
    epochs: 2      # two, so that the best one is chosen (the stage's outputs are checked below)
    batch_size: 64
    min_steps: 0   # one pass: this pipeline checks the plumbing, not learning
  automl:
    max_trials: 1
    epochs: 10
    block_types: [vanilla]
    input_size: 16
"""  # 10 epochs of the small search model (seconds at 16 px): enough to beat the baseline, so serve runs


def keep_per_class(data: Path, count: int) -> None:
    """Trim the demo data to ``count`` images a class (manifest rows and the folder class alike)."""
    lines = (data / "manifest.csv").read_text().splitlines()
    kept, seen = [lines[0]], {}
    for line in lines[1:]:
        label = line.rsplit(",", 1)[-1]
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= count:
            kept.append(line)
    (data / "manifest.csv").write_text("\n".join(kept) + "\n")
    for path in sorted((data / "local").rglob("*.*"))[count:]:
        path.unlink()


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    """The whole pipeline on 16 demo digits a class with a tiny overlay (32 px, two epochs, one trial)."""
    repo = copy_pipeline(tmp_path_factory.mktemp("tiny"))
    (repo / "dvc.lock").unlink()
    demo_data.main(["--out", str(repo / "data")])
    keep_per_class(repo / "data", 16)
    (repo / "data" / "params.yaml").write_text(TINY)
    return repo


@pytest.mark.slow
def test_whole_pipeline_runs_reruns_nothing_and_reproduces_bit_identically(tiny_repo):
    printed = dvc(tiny_repo, "repro")
    assert "val accuracy" in printed and "test accuracy" in printed
    scores = [json.loads((tiny_repo / "reports" / name / "metrics.json").read_text())
              for name in ("train_resnet", "train_automl")]
    # A trainer whose model fails the baseline guard says so loudly; one that passes does not.
    assert ("NO BETTER THAN CHANCE" in printed) == (not all(score["beats_baseline"] for score in scores))
    lock = (tiny_repo / "dvc.lock").read_text()
    stages = yaml.safe_load(lock)["stages"]
    assert set(stages) == {"download", "pack", "train_resnet", "train_automl", "export@resnet50v2",
                           "export@autokeras", "serve"}
    for name, model in (("train_resnet", "resnet50v2"), ("train_automl", "autokeras")):
        assert (tiny_repo / "build/models" / model / "model.keras").is_file()
        assert (tiny_repo / "reports" / name / "pictures" / "confusion.png").is_file()
        assert json.loads((tiny_repo / "reports/export" / model / "metrics.json").read_text())["parity"]["passed"]
    served = json.loads((tiny_repo / "reports/serve/metrics.json").read_text())
    assert served["beats_baseline"]  # `best` serves only a model that beats the weighted random guess
    for split in ("val", "test"):
        assert served["http_accuracy"][split] == pytest.approx(served["offline_accuracy"][split], abs=1e-6)
    assert (tiny_repo / "build/triton" / served["model"] / "config.pbtxt").is_file()

    assert "Running stage" not in dvc(tiny_repo, "repro")  # nothing changed, nothing runs
    # Bytecode Python writes beside the code a stage imports is no change to that stage (.dvcignore).
    stray = tiny_repo / "imgpipe" / "export" / "__pycache__" / "stray.cpython-311.pyc"
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"not source")
    assert "up to date" in dvc(tiny_repo, "status")
    stray.unlink()
    shown = dvc(tiny_repo, "metrics", "show")
    assert "reports/train_resnet/metrics.json" in shown and "reports/train_automl/metrics.json" in shown
    header = shown.splitlines()[0].split()  # DVC sorts the columns: accuracy.test beside accuracy.val
    for metric in ("accuracy", "macro_f1"):
        assert header.index(f"{metric}.val") == header.index(f"{metric}.test") + 1, header
    dvc(tiny_repo, "plots", "show", "-o", str(tiny_repo / "plots"))
    page = (tiny_repo / "plots" / "index.html").read_text()
    assert "Loss per epoch" in page and "AutoKeras confusion matrix (validation)" in page

    # The stages after the trainers again, forced: each output bit-identical, so dvc.lock unchanged.
    # The others' forced reruns are shown where they cost less: download and pack on the demo data
    # (tests/test_demo_data.py), each trainer in a new process (tests/test_train_resume.py and
    # tests/test_train_automl.py compare two runs' model bytes and reports).
    dvc(tiny_repo, "repro", "-f", "-s", "export@resnet50v2", "export@autokeras", "serve")
    assert (tiny_repo / "dvc.lock").read_text() == lock


@pytest.mark.slow
def test_the_resnet_stage_writes_metrics_plots_pictures_and_its_neptune_run(tiny_repo):
    """What train_resnet leaves, read from the tiny pipeline's run (a trained ResNet50V2 is the
    expensive part, so these checks share the pipeline's)."""
    import keras
    import numpy as np

    from imgpipe.records.read import make_dataset
    from tools import compare

    reports, records = tiny_repo / "reports" / "train_resnet", tiny_repo / "build" / "tfrecords"
    labels = json.loads((records / "labels.json").read_text())
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["head"] == "softmax" and metrics["image_size"] == 32 and metrics["weights"] == "none"
    per_class = json.loads((reports / "per_class.json").read_text())
    for split in ("val", "test"):
        assert 0 <= metrics["accuracy"][split] <= 1 and set(per_class[split]) == set(labels)
    # The guard is the val macro-F1 against the weighted random guess plus the margin.
    assert metrics["beats_baseline"] == (metrics["macro_f1"]["val"]
                                         >= metrics["baseline_macro_f1"]["val"] + metrics["baseline_margin"])
    assert metrics["epochs_run"] == 2 and metrics["best_epoch"] in (1, 2)
    history = list(csv.DictReader((reports / "history.csv").open()))
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history[0])
    best = min(history, key=lambda row: float(row["val_loss"]))
    assert int(best["epoch"]) == metrics["best_epoch"]  # the best epoch by validation loss is kept

    packed = json.loads((tiny_repo / "reports" / "pack" / "metrics.json").read_text())["per_class"].values()
    for split, name in (("val", "confusion.csv"), ("test", "confusion_test.csv")):
        confusion = list(csv.DictReader((reports / name).open()))
        assert len(confusion) == sum(v[split] for v in packed) and set(confusion[0]) == {"actual", "predicted"}
    for picture in ("curves", "confusion", "confusion_test", "mistakes"):
        assert (reports / "pictures" / f"{picture}.png").read_bytes().startswith(b"\x89PNG")

    # The saved model is the evaluated one: its predictions reproduce the reported accuracies.
    model = keras.models.load_model(tiny_repo / "build" / "models" / "resnet50v2" / "model.keras")
    for split in ("val", "test"):
        data = make_dataset(records, split, 8, 32, training=False)
        predicted = model.predict(data, verbose=0).argmax(axis=1)
        truth = np.concatenate([y.numpy() for _, y in data])
        assert np.mean(predicted == truth) == pytest.approx(metrics["accuracy"][split], abs=1e-6)

    [run] = [run for run in compare.find_runs(tiny_repo / ".neptune") if run.name == "resnet50v2"]
    for split in ("val", "test"):
        assert run.values[f"metrics/{split}/macro_f1"] == pytest.approx(metrics["macro_f1"][split])
    assert run.values["metrics/beats_baseline"] == metrics["beats_baseline"]
    assert [step for step, _ in run.series["train/val_loss"]] == [1, 2]
    assert len(run.values["data/version"]) == 64


@pytest.mark.slow
def test_changing_one_parameter_reruns_only_its_stage(tiny_repo):
    params = (tiny_repo / "params.yaml").read_text()
    (tiny_repo / "params.yaml").write_text(params.replace("learning_rate: 0.001", "learning_rate: 0.002", 1))
    try:
        status = json.loads(dvc(tiny_repo, "status", "--json"))
    finally:
        (tiny_repo / "params.yaml").write_text(params)
    assert set(status) == {"train_resnet"}  # export and serve follow once it has run: their input changes


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.email=ci@example.com", "-c", "user.name=CI", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout


@pytest.mark.slow
def test_dag_chains_the_stages(tiny_repo):
    edges = set()
    for line in dvc(tiny_repo, "dag", "--dot").splitlines():
        if "->" in line:
            source, target = (part.strip().strip(";").strip('"') for part in line.split("->"))
            edges.add((source, target))
    assert {("download", "pack"), ("pack", "train_resnet"), ("pack", "train_automl"),
            ("train_resnet", "export@resnet50v2"), ("train_automl", "export@autokeras"),
            ("export@resnet50v2", "serve"), ("export@autokeras", "serve")} <= edges


def workspace(repo: Path) -> dict[str, str]:
    """sha256 of every file DVC tracks here (outputs, data, the released model)."""
    import hashlib

    return {p.relative_to(repo).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in ("data", "build/images", "build/tfrecords", "build/models", "build/onnx", "build/serving",
                           "build/triton", "model") for p in sorted((repo / folder).rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_push_clone_pull_reproduces_the_workspace_and_model_dvc_alone_serves(tiny_repo, tmp_path):
    """Share through a local DVC remote: a clone pulls the same bytes, and a serving host needs
    only `dvc pull model.dvc`."""
    from serve.app import Settings, create_app
    from serve.running import running

    subprocess.run([sys.executable, "-m", "tools.release"], cwd=tiny_repo, env=venv_env(), check=True,
                   capture_output=True)
    dvc(tiny_repo, "add", "-q", "data")  # the trimmed demo data
    dvc(tiny_repo, "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    git(tiny_repo, "add", "-A")
    git(tiny_repo, "commit", "-q", "-m", "tiny pipeline")
    assert "model.dvc" in git(tiny_repo, "ls-files").split()
    assert all(name.endswith(".gitignore") for name in git(tiny_repo, "ls-files", "build").split())
    dvc(tiny_repo, "push")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(tiny_repo), str(clone))
    dvc(clone, "pull")
    assert workspace(clone) == workspace(tiny_repo)
    assert "up to date" in dvc(clone, "status")

    # DVC's artifact commands find the released model by its name in dvc.yaml and a version tag.
    git(tiny_repo, "tag", "-a", "image-classifier@v0.1.0", "-m", "image-classifier v0.1.0")  # GTO: annotated tags
    dvc(tmp_path, "artifacts", "get", str(tiny_repo), "image-classifier", "-o", str(tmp_path / "fetched"))
    assert tree(tmp_path / "fetched") == tree(tiny_repo / "model")

    host = tmp_path / "host"
    git(tmp_path, "clone", "-q", str(tiny_repo), str(host))
    dvc(host, "pull", "model.dvc")
    assert {p.name for p in (host / "build").rglob("*") if p.is_file()} == {".gitignore"}  # no outputs pulled
    assert tree(host / "model") == tree(tiny_repo / "model")
    with running(create_app(Settings(bundle=host / "model"))) as url:
        import httpx

        name, data = next(iter(sorted(kept_images(tiny_repo / "build/images").items())))
        answer = httpx.post(url + "/predict", files={"image": (Path(name).name, data)}).json()
    assert answer["model"]["version"] == json.loads((tiny_repo / "model/metadata.json").read_text())["version"]


@pytest.mark.slow
def test_the_same_round_trip_through_an_s3_remote(tiny_repo, tmp_path, monkeypatch):
    """dvc-s3 against moto's S3 server on loopback: the data, the TFRecords and the released model
    (the trained .keras files are left out to keep the suite fast; they travel the same way)."""
    import boto3
    from moto.server import ThreadedMotoServer

    assert (tiny_repo / "model.dvc").is_file(), "runs after the local-remote round trip, which releases the model"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="team-dvc")
        clone = tmp_path / "clone"
        git(tmp_path, "clone", "-q", str(tiny_repo), str(clone))
        for repo in (tiny_repo, clone):
            dvc(repo, "remote", "add", "-f", "s3", "s3://team-dvc/cache")
            dvc(repo, "remote", "modify", "s3", "endpointurl", endpoint)
        targets = ("data.dvc", "model.dvc", "download", "pack")
        dvc(tiny_repo, "push", "-r", "s3", *targets)
        keys = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket="team-dvc")["KeyCount"]
        assert keys > 0
        dvc(clone, "pull", "-r", "s3", *targets)
    finally:
        server.stop()
    wanted = ("data/", "build/images/", "build/tfrecords/", "model/")
    assert {k: v for k, v in workspace(clone).items() if k.startswith(wanted)} == {
        k: v for k, v in workspace(tiny_repo).items() if k.startswith(wanted)}


@pytest.mark.slow
def test_experiments_are_listed_by_dvc_and_by_compare(tiny_repo):
    """A batch-size sweep of the AutoKeras search as DVC experiments (up to the trainer, as one
    does before exporting the winner): `dvc exp show` lists both models' metrics for each, `dvc
    plots diff` draws them together, and `tools.compare` finds the same runs in Neptune's offline
    data by name. (The search is the cheaper trainer to sweep here; a ResNet50V2 sweep is the same
    commands with train.resnet keys.)"""
    rates = {"batch-high": "64", "batch-low": "8"}
    for name, rate in rates.items():
        dvc(tiny_repo, "exp", "run", "train_automl", "-n", name, "-S", f"train.automl.batch_size={rate}")

    shown = {row["Experiment"]: row for row in csv.DictReader(io.StringIO(dvc(tiny_repo, "exp", "show", "--csv")))}
    assert set(rates) <= set(shown)
    for name, rate in rates.items():
        row = shown[name]
        assert int(row["train.automl.batch_size"]) == int(rate)
        for metrics in ("reports/train_resnet/metrics.json", "reports/train_automl/metrics.json"):
            assert 0 <= float(row[f"{metrics}:accuracy.val"]) <= 1, (name, metrics)
            assert 0 <= float(row[f"{metrics}:accuracy.test"]) <= 1, (name, metrics)

    dvc(tiny_repo, "plots", "diff", *rates, "-o", str(tiny_repo / "exp-plots"))
    page = (tiny_repo / "exp-plots" / "index.html").read_text()
    assert all(name in page for name in rates) and "Loss per epoch" in page

    def compare(*flags: str) -> list[list[str]]:  # the table in a 100-column terminal, as header and rows
        from tests.test_compare_table import grid

        table = subprocess.run([sys.executable, "-m", "tools.compare", *flags], cwd=tiny_repo,
                               env={**venv_env(), "COLUMNS": "100"}, capture_output=True, text=True, check=True)
        assert max(map(len, table.stdout.splitlines())) <= 100 and not table.stderr, table.stdout + table.stderr
        return grid(table.stdout)

    header, *rows = compare()
    assert set(rates) <= {row[header.index("experiment")] for row in rows if row[0] == "autokeras"}
    header, *rows = compare("--experiment", "batch-high", "--params", "automl.batch_size")
    assert {row[header.index("experiment")] for row in rows} == {"batch-high"}
    assert [int(row[header.index("batch_size")]) for row in rows if row[0] == "autokeras"] == [64]

    # The report of every run of the sweep, opened in the browser: each run in the table and in each chart.
    from tests.browser import chromium
    from tools.compare import find_runs

    subprocess.run([sys.executable, "-m", "tools.compare", "--html", "compare.html"], cwd=tiny_repo, env=venv_env(),
                   capture_output=True, text=True, check=True)
    runs = find_runs(tiny_repo / ".neptune")
    report = tiny_repo / "compare.html"
    with chromium() as browser:
        page = browser.page(width=1280, height=900)
        page.goto(report.as_uri())
        assert browser.foreign_requests() == [report.as_uri()]  # the file itself, and nothing else
        assert page.locator("table.runs tbody tr").count() == len(runs) >= 4
        for chart in page.locator("figure.series").all():
            if chart.get_attribute("data-series", timeout=1000).startswith("train/"):
                for run in runs:
                    assert chart.locator(f'.legend [data-run="{run.run_id}"]').count() == 1, run.run_id
        assert page.evaluate("document.scrollingElement.scrollWidth <= innerWidth")
        page.screenshot(path=str(tiny_repo / "compare.png"), full_page=True)

    dvc(tiny_repo, "exp", "apply", "batch-high")  # keep the winner (then `dvc repro` exports it)
    assert yaml.safe_load((tiny_repo / "params.yaml").read_text())["train"]["automl"]["batch_size"] == 64
    applied = json.loads((tiny_repo / "reports/train_automl/metrics.json").read_text())["accuracy"]["val"]
    assert applied == pytest.approx(float(shown["batch-high"]["reports/train_automl/metrics.json:accuracy.val"]),
                                    abs=1e-4)
    assert "reports/train_automl/metrics.json" in dvc(tiny_repo, "metrics", "diff", "--all")  # against HEAD


@pytest.mark.slow
@pytest.mark.parametrize("notebook", ["1_dataset", "2_experiments", "3_error_analysis"])
def test_notebooks_run_against_the_pipeline_outputs(tiny_repo, notebook):
    import nbclient
    import nbformat

    path = tiny_repo / "notebooks" / f"{notebook}.ipynb"
    executed = nbclient.NotebookClient(nbformat.read(path, as_version=4), timeout=300, kernel_name="python3",
                                       resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [output for cell in executed.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs)  # its pictures were drawn
