"""The training backups' key and folder: which backup a run may resume, and what it cleans up."""

from __future__ import annotations

import json

from imgpipe.records.read import epoch_seed
from imgpipe.training import backup


def test_the_key_changes_with_the_parameters_and_with_any_byte_of_the_inputs(tmp_path):
    data = tmp_path / "train-00000-of-00001.tfrecord"
    data.write_bytes(b"records")
    key = backup.inputs_key({"epochs": 3}, [data])
    assert key == backup.inputs_key({"epochs": 3}, [data]) and len(key) == 16
    assert backup.inputs_key({"epochs": 4}, [data]) != key
    data.write_bytes(b"recordz")
    assert backup.inputs_key({"epochs": 3}, [data]) != key
    code = backup.training_inputs(tmp_path)
    assert code[0] == data and any(path.name == "backup.py" for path in code)  # the code is part of the key


def test_a_run_with_other_inputs_removes_the_stale_backup_and_a_finished_run_its_own(tmp_path):
    workdir = tmp_path / ".cache" / "train_resnet"
    (workdir / "stale").mkdir(parents=True)
    (workdir / "stale" / "epoch3.weights.h5").write_bytes(b"x" * 100)
    (workdir / "kept-file").write_text("not a backup folder")
    folder = backup.backup_folder(workdir, "fresh", "train_resnet")
    assert folder == workdir / "fresh" and not (workdir / "stale").exists() and (workdir / "kept-file").exists()
    folder.mkdir()
    (workdir / "kept-file").unlink()
    backup.remove(folder)
    assert not (tmp_path / ".cache").exists()  # emptied work folders go too, nothing else does
    (tmp_path / ".cache" / "download").mkdir(parents=True)
    (tmp_path / ".cache" / "train_resnet" / "k").mkdir(parents=True)
    backup.remove(tmp_path / ".cache" / "train_resnet" / "k")
    assert sorted(p.name for p in (tmp_path / ".cache").iterdir()) == ["download"]


def test_only_a_complete_state_is_resumed(tmp_path):
    assert backup.load_state(tmp_path) is None
    state = {"epoch": 2, "phase": 0, "weights": "epoch2.weights.h5", "best": {"epoch": 1, "file": "best1.npz"}}
    (tmp_path / backup.STATE).write_text(json.dumps(state))
    assert backup.load_state(tmp_path) is None  # its files are missing
    (tmp_path / "epoch2.weights.h5").write_bytes(b"w")
    (tmp_path / "best1.npz").write_bytes(b"b")
    assert backup.load_state(tmp_path) == state
    (tmp_path / backup.STATE).write_text('{"epoch": 2, "wei')  # cut short
    assert backup.load_state(tmp_path) is None


def test_each_epochs_data_seed_depends_on_the_seed_and_that_epoch_alone():
    seeds = [epoch_seed(42, epoch) for epoch in range(50)]
    assert len(set(seeds)) == 50 and all(0 <= s < 2**31 for s in seeds)
    assert seeds[7] == epoch_seed(42, 7) and epoch_seed(43, 7) != seeds[7]
