"""A ResNet50V2 training killed mid-run resumes to the very model an uninterrupted run makes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train_resnet import PARAMS, ROOT


def stage_command(params: Path, records: Path, folder: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "stages.train_resnet", "--params", str(params), "--records", str(records),
            "--out", str(folder / "model"), "--reports", str(folder / "reports"), *flags]


@pytest.mark.slow
def test_a_run_killed_after_its_second_epoch_resumes_to_the_same_model(tmp_path, records):
    """SIGKILL once epoch 2 is backed up (Keras prints "Epoch 3/3" after every epoch-end callback),
    rerun: the model is bit-identical to an uninterrupted run's, and the finished run leaves no
    backup. Dropout (a seed generator's state), two passes per epoch (reshuffled, augmented) and
    early stopping's counters are all in play."""
    import hashlib
    import signal

    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.replace("epochs: 2", "epochs: 3").replace("patience: 0", "patience: 2")
                      .replace("min_steps: 0", "min_steps: 18") + "    dropout: 0.2\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NEPTUNE_MODE": "debug", "PYTHONUNBUFFERED": "1"}
    for name in ("whole", "killed"):
        (tmp_path / name).mkdir()
    subprocess.run(stage_command(params, records[3], tmp_path / "whole"), cwd=tmp_path / "whole", env=env,
                   check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    run = subprocess.Popen(stage_command(params, records[3], killed), cwd=killed, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    for line in run.stdout:
        if line.startswith("Epoch 3/"):
            run.send_signal(signal.SIGKILL)
            break
    assert run.wait(timeout=60) == -signal.SIGKILL
    [state] = (killed / ".cache" / "train_resnet").glob("*/state.json")
    assert json.loads(state.read_text())["epoch"] == 2 and not (killed / "model").exists()

    resumed = subprocess.run(stage_command(params, records[3], killed), cwd=killed, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch 2 of 3" in resumed.stderr and "Epoch 1/" not in resumed.stdout
    model = [hashlib.sha256((folder / "model" / "model.keras").read_bytes()).hexdigest()
             for folder in (tmp_path / "whole", killed)]
    assert model[0] == model[1]
    for report in ("history.csv", "metrics.json"):
        assert (killed / "reports" / report).read_bytes() == (tmp_path / "whole" / "reports" / report).read_bytes()
    assert not (killed / ".cache").exists()  # finished: the backup is removed
