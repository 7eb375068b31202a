"""Where an interrupted training keeps what it needs to resume, and under which key.

A trainer backs up into ``<workdir>/<key>/`` (``.cache/<stage>/`` by default: outside DVC's
outputs, ignored by git). ``key`` hashes everything the result depends on: the parameters, every
byte of the records, this checkout's code and the TensorFlow and Keras versions. So a rerun with
the same inputs resumes, and a run with other inputs starts afresh (and deletes the stale backup,
hundreds of MB for ResNet50V2). A finished run removes its backup.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]


def code_files() -> list[Path]:
    """The Python code a stage runs: the library package and the stage scripts."""
    return sorted([*(ROOT / "imgpipe").rglob("*.py"), *(ROOT / "stages").glob("*.py")])


def inputs_key(parameters: dict, files: Iterable[Path]) -> str:
    """16 hex digits of sha256 over the parameters (as JSON), each file's name and bytes, and the
    TensorFlow and Keras versions (the same code on another Keras may train another model)."""
    import keras
    import tensorflow as tf

    digest = hashlib.sha256(json.dumps(parameters, sort_keys=True, default=str).encode())
    digest.update(f"tensorflow {tf.__version__} keras {keras.__version__}".encode())
    for path in files:
        digest.update(b"\0" + path.name.encode() + b"\0")
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def training_inputs(records: Path, extra: Iterable[Path] = ()) -> list[Path]:
    """Every file under the records folder, the code, and ``extra`` (a weights file), in a fixed order."""
    return [*sorted(p for p in Path(records).rglob("*") if p.is_file()), *code_files(), *extra]


def backup_folder(workdir: Path, key: str, name: str) -> Path:
    """``workdir / key``; other keys' backups in ``workdir`` are from other inputs and can never
    be resumed by this run: they are removed (each is a full model with its optimizer state)."""
    if workdir.is_dir():
        for stale in sorted(workdir.iterdir()):
            if stale.is_dir() and stale.name != key:
                log.info("%s: removing %s, the backup of a run with other inputs", name, stale)
                shutil.rmtree(stale, ignore_errors=True)
    return workdir / key


def remove(folder: Path) -> None:
    """A finished run's backup, and its work folder when nothing else is left in it."""
    shutil.rmtree(folder, ignore_errors=True)
    for parent in (folder.parent, folder.parent.parent):  # the work folder, and .cache if it made it
        try:
            parent.rmdir()
        except OSError:
            break  # not empty (other stages' caches), or already gone



# What one epoch's end leaves in the backup folder: the state file is written last (atomically),
# so a kill at any moment leaves either the previous epoch's complete state or this one's.
STATE = "state.json"


def load_state(folder: Path) -> dict | None:
    """The last finished epoch's state, or None when there is nothing (or nothing whole) to resume."""
    try:
        state = json.loads((folder / STATE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    needed = [state.get("weights"), *([state["best"]["file"]] if state.get("best", {}).get("file") else [])]
    return state if all(name and (folder / name).is_file() for name in needed) else None


def seed_generators(model) -> list:  # type: ignore[no-untyped-def]
    """Every ``keras.random.SeedGenerator`` of the model's layers (dropout's). Their states are
    variables that ``save_weights`` leaves out, yet they decide the next epoch's dropout masks."""
    found = []
    for layer in model._flatten_layers(include_self=True, recursive=True):  # noqa: SLF001
        found.extend(getattr(layer, "_seed_generators", []))
    return found


def save_epoch(folder: Path, model, epoch: int, phase: int, extra: dict,  # type: ignore[no-untyped-def]
               best: dict, best_weights: list | None) -> None:
    """Back up the end of ``epoch`` (1-based) of training phase ``phase``: the weights with the
    optimizer's (its step drives the learning-rate schedule), the seed generators, the best
    epoch's weights (written once per best epoch; ``best["epoch"]`` says which) and ``extra`` and
    ``best`` (the callbacks' state), then the state file; older files go last."""
    best_epoch = best["epoch"]
    folder.mkdir(parents=True, exist_ok=True)
    weights = f"epoch{epoch}.weights.h5"
    model.save_weights(folder / weights, overwrite=True)
    best_file = f"best{best_epoch}.npz" if best_weights is not None else None
    if best_file and not (folder / best_file).exists():
        scratch = folder / f".{best_file}"
        with open(scratch, "wb") as file:
            np.savez(file, *best_weights)
        os.replace(scratch, folder / best_file)
    state = {"epoch": epoch, "phase": phase, "weights": weights,
             "seed_generators": [generator.state.numpy().tolist() for generator in seed_generators(model)],
             "best": {**best, "file": best_file}, **extra}
    scratch = folder / f".{STATE}"
    scratch.write_text(json.dumps(state))  # insertion order: history rows keep their column order
    os.replace(scratch, folder / STATE)
    for old in folder.iterdir():
        if old.name not in (STATE, weights, best_file):
            old.unlink()


def restore_epoch(folder: Path, model, state: dict) -> list | None:  # type: ignore[no-untyped-def]
    """Put back what ``save_epoch`` wrote into a model compiled as it was then; returns the best
    epoch's weights. The optimizer is built first, or Keras would skip its saved variables."""
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(folder / state["weights"])
    generators = seed_generators(model)
    if len(generators) != len(state["seed_generators"]):
        raise ValueError(f"{folder}: the backup has {len(state['seed_generators'])} seed generators, "
                         f"the model {len(generators)}")
    for generator, value in zip(generators, state["seed_generators"], strict=True):
        generator.state.assign(np.array(value, dtype=generator.state.dtype))
    if not state["best"]["file"]:
        return None
    with np.load(folder / state["best"]["file"]) as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
