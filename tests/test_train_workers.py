"""train.strategy multi_worker: two workers on loopback, as two machines would run it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import keras
import numpy as np
import pytest

from imgpipe.records.read import make_dataset
from tests.test_train_resnet import PARAMS, ROOT
from tests.test_train_resume import stage_command
from tools import compare


def free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_trains_on_two_loopback_workers_and_only_the_chief_writes(tmp_path, records):
    """Two processes with TF_CONFIG on loopback, as two machines would run the same command."""
    (tmp_path / "params.yaml").write_text(PARAMS)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    workers = []
    for index in (0, 1):
        folder = tmp_path / f"worker{index}"
        folder.mkdir()
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        workers.append(subprocess.Popen(
            stage_command(tmp_path / "params.yaml", records[3], Path("."), "--strategy", "multi_worker"),
            cwd=folder, env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CONFIG": config, "NEPTUNE_MODE": "offline",
                             "NEPTUNE_DATA_DIRECTORY": str(folder / ".neptune")},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [worker.communicate(timeout=900) for worker in workers]
    for worker, (_, stderr) in zip(workers, results, strict=True):
        assert worker.returncode == 0, stderr[-3000:]
        assert "multi_worker (CollectiveAllReduceStrategy) with 2 replica(s)" in stderr
    chief, other = tmp_path / "worker0", tmp_path / "worker1"
    metrics = json.loads((chief / "reports" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and len(compare.find_runs(chief / ".neptune")) == 1
    # Both workers computed the same numbers; the chief's saved model reproduces them.
    printed = [stdout.strip().splitlines()[-1] for stdout, _ in results]
    assert printed[0].split("; best epoch")[0] == printed[1].split("; best epoch")[0]
    model = keras.models.load_model(chief / "model" / "model.keras")
    data = make_dataset(records[3], "val", 8, 32, training=False)
    predicted = model.predict(data, verbose=0).argmax(axis=1)
    assert np.mean(predicted == np.concatenate([y.numpy() for _, y in data])) == pytest.approx(
        metrics["accuracy"]["val"], abs=1e-6)
    assert list(other.iterdir()) == []  # the other worker wrote nothing: no model, reports, run or backup
