"""An AutoKeras architecture search on the packed TFRecords.

``autokeras.ImageClassifier`` tries ``train.automl.max_trials`` models (tuner, epochs per trial,
the architectures to consider and an optional smaller search size come from params.yaml), each
stopped early on validation loss and kept at its best epoch. The best is saved as ``model.keras``
with AutoKeras' own layers swapped for plain Keras ones, so it loads without AutoKeras. Every
trial's hyperparameters, score and epochs go to ``trials.csv`` and to Neptune; the metrics, plots
and pictures are the ResNet trainer's (``imgpipe.training.reports.publish``).

AutoKeras 3 takes NumPy arrays only (its adapters refuse tf.data), so both splits are read into
memory through ``imgpipe.records.read`` (same records, same pixels, uint8: image_size^2 * 3 bytes per
image). The search state (trials, checkpoints) lives in a work folder, outside DVC's outputs.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgpipe.errors import StageError
from imgpipe.params import Params
from imgpipe.records.read import DatasetError, load_arrays, record_image_size
from imgpipe.training.evaluation import Scores
from imgpipe.training.models import class_weights, params_head, seed_everything, strategy_for
from imgpipe.training.reports import Predictions, history_row, publish, start_run, write_dict_csv
from imgpipe.training.tracking import Tracker

MODEL_NAME = "autokeras"
PROJECT = "image_classifier"
# AutoKeras' hyperparameter names for the ImageBlock's choices (autokeras/blocks/wrapper.py).
BLOCK_TYPE = "image_block_1/block_type"
PRETRAINED = ("res_net_block_1", "xception_block_1", "efficient_net_block_1")


@dataclass(frozen=True)
class Searched:
    scores: Scores  # of the saved (plain Keras) best model on the whole val and test splits
    trials_run: int
    best_trial: str  # KerasTuner's own id, as it names the trial (zero-padded)
    architecture: str
    best_epoch: int


def search_space(block_types: list[str], fixed: dict):  # type: ignore[no-untyped-def]
    """Hyperparameters declared before AutoKeras declares its own: registered first, they win.

    The architectures are limited to ``block_types``, ImageNet weights are never used (nothing
    may be downloaded at run time), and ``fixed`` pins values by name."""
    import keras_tuner

    hp = keras_tuner.HyperParameters()
    if BLOCK_TYPE not in fixed:
        hp.Choice(BLOCK_TYPE, list(block_types))
    for name, value in sorted(fixed.items()):
        hp.Fixed(name, value)
    for block in PRETRAINED:
        hp.Fixed(f"image_block_1/{block}/pretrained", False)
    return hp


def tuner_for(name: str, block_types: list[str]) -> dict:
    """ImageClassifier's tuner arguments. For ``greedy`` these are AutoKeras' own defaults for
    images (its task-specific tuner): first the configurations it knows work, limited to the
    allowed architectures and to those without ImageNet weights, then greedy variations."""
    if name != "greedy":
        return {"tuner": name}
    from autokeras.tuners import greedy, task_specific

    known = [hps for hps in task_specific.IMAGE_CLASSIFIER if hps.get(BLOCK_TYPE) in block_types
             and not any(key.endswith("/pretrained") and value for key, value in hps.items())]
    return {"tuner": greedy.Greedy, "initial_hps": known}


def seed_each_trial(oracle, seed: int) -> None:  # type: ignore[no-untyped-def]
    """Make each trial's draw depend on the seed alone.

    Two sources of chance escape the tuner's seed: the greedy oracle picks which
    hyperparameters to vary with ``np.random.choice`` on NumPy's global generator, which
    training draws from in between; and KerasTuner fills any value a trial leaves unset (the
    known configurations set only some) from an unseeded ``random.Random()``. So the global
    generator is reseeded per trial and unset values get their declared defaults. Pinned
    (Fixed) values override whatever a known configuration says."""
    import keras_tuner

    draw = oracle.populate_space

    def seeded(trial_id: str) -> dict:
        np.random.seed((seed + int(trial_id)) % 2**32)
        result = draw(trial_id)
        if result.get("values") is not None:
            for hp in oracle.hyperparameters.space:
                if isinstance(hp, keras_tuner.engine.hyperparameters.Fixed):
                    result["values"][hp.name] = hp.value
                else:
                    result["values"].setdefault(hp.name, hp.default)
        return result

    oracle.populate_space = seeded


def targets(labels: np.ndarray, classes: int) -> np.ndarray:
    """One 0/1 column for two classes (AutoKeras then uses a sigmoid), one-hot rows otherwise."""
    if classes == 2:
        return labels.reshape(-1, 1).astype(np.float32)
    return np.eye(classes, dtype=np.float32)[labels]


def resizer(size: int, search_size: int):  # type: ignore[no-untyped-def]
    """The Resizing layer that maps pack-size images to the search size, or None when they agree."""
    import keras

    if search_size in (0, size):
        return None
    return keras.layers.Resizing(search_size, search_size, interpolation="bilinear", name="resize")


def search_pixels(images: np.ndarray, resize) -> np.ndarray:  # type: ignore[no-untyped-def]
    """float32 images as the search sees them: through the very layer the saved model starts with."""
    if resize is None:
        return images.astype(np.float32)
    return np.concatenate([np.asarray(resize(images[i:i + 256].astype(np.float32)))
                           for i in range(0, len(images), 256)])


def portable(model, size: int, resize=None):  # type: ignore[no-untyped-def]
    """The same network with AutoKeras' layers replaced by plain Keras ones, taking float32
    ``size`` x ``size`` images.

    AutoKeras adds ``CastToFloat32`` after the input (an identity on float32 images); it becomes
    ``resize`` (when the search ran on smaller images) or an Identity. Everything else AutoKeras
    builds from stock Keras layers; any other AutoKeras layer is refused rather than saving a
    model that needs AutoKeras to load."""
    import keras

    def clone(layer):  # type: ignore[no-untyped-def]
        kind = type(layer)
        if kind.__module__.startswith("autokeras"):
            if kind.__name__ != "CastToFloat32":
                raise StageError(f"the best model holds AutoKeras layer {kind.__name__}, which has no plain Keras twin")
            return resize if resize is not None else keras.layers.Identity(name=layer.name)
        return layer  # shared, with its weights and adapted state (Normalization's mean and variance)

    image = keras.Input(shape=(size, size, 3), dtype="float32", name="image")
    inputs = [image] if isinstance(model.input, list) else image
    return keras.models.clone_model(model, input_tensors=inputs, clone_function=clone)


def active_values(hyperparameters) -> dict:  # type: ignore[no-untyped-def]
    """The values that shaped the model. Inactive ones (say, the filters of a block that is not
    there) are left over from sampling and vary between identical runs."""
    return {name: value for name, value in sorted(hyperparameters.values.items())
            if hyperparameters.is_active(name)}


def trial_rows(oracle) -> list[dict]:  # type: ignore[no-untyped-def]
    """One row per trial: id, status, score (best val loss), best epoch and its active hyperparameters."""
    rows = []
    for trial_id in sorted(oracle.trials, key=int):
        trial = oracle.trials[trial_id]
        score = trial.score
        rows.append({"trial": int(trial_id), "status": trial.status,
                     "val_loss": "" if score is None else round(float(score), 6),
                     "best_epoch": "" if trial.best_step is None else int(trial.best_step) + 1,
                     "hyperparameters": json.dumps(active_values(trial.hyperparameters))})
    return rows


def epoch_recorder(tuner):  # type: ignore[no-untyped-def]
    """A Keras callback recording every trial's per-epoch numbers, keyed by trial id.

    KerasTuner hands the oracle only each trial's best epoch, and gives every trial a deep copy
    of the callbacks; this one returns itself from ``__deepcopy__`` so all trials share it, and
    learns the running trial's id by wrapping ``tuner.run_trial``."""
    import keras

    class EpochRecorder(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.trials: dict[str, list[dict]] = {}
            self.current = ""

        def __deepcopy__(self, memo: dict) -> EpochRecorder:
            return self

        def on_train_begin(self, logs: dict | None = None) -> None:
            self.trials[self.current] = []  # a retried fit starts the trial's history again

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.trials[self.current].append(history_row(epoch + 1, logs or {}))

    recorder = EpochRecorder()
    run_trial = tuner.run_trial

    def tracked(trial, *args, **kwargs):  # type: ignore[no-untyped-def]
        recorder.current = trial.trial_id
        return run_trial(trial, *args, **kwargs)

    tuner.run_trial = tracked
    return recorder


def trial_history(recorder, trial) -> list[dict]:  # type: ignore[no-untyped-def]
    """Per-epoch loss/accuracy of one trial; for a trial resumed from an earlier run (overwrite:
    false) only KerasTuner's record of its best epoch is left."""
    if trial.trial_id in recorder.trials:
        return recorder.trials[trial.trial_id]
    epochs: dict[int, dict] = {}
    for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
        if trial.metrics.exists(name):
            for observation in trial.metrics.get_history(name):
                epochs.setdefault(observation.step + 1, {})[name] = observation.mean()
    return [history_row(epoch, logs) for epoch, logs in sorted(epochs.items())]


def log_trials(tracker: Tracker, oracle, recorder, rows: list[dict]) -> None:  # type: ignore[no-untyped-def]
    for row in rows:
        base = f"trials/{row['trial']}"
        tracker.set(f"{base}/status", row["status"])
        tracker.set(f"{base}/hyperparameters", json.loads(row["hyperparameters"]))
        if row["val_loss"] != "":
            tracker.set(f"{base}/score", row["val_loss"])
            tracker.log("trials/score", row["val_loss"], step=row["trial"])
        for epoch in trial_history(recorder, oracle.trials[str(row["trial"])]):
            for key, value in epoch.items():
                if key != "epoch":
                    tracker.log(f"{base}/train/{key}", value, step=epoch["epoch"])


def quiet_known_notices() -> None:
    """Keras warns on every AutoKeras trial that a one-input model got a bare tensor, and when
    KerasTuner reloads a trial's weights without its optimizer state: both expected, neither
    actionable, and they would bury the search's own lines."""
    warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match", category=UserWarning)
    warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer", category=UserWarning)


def search(params: Params, records: Path, out: Path, reports: Path, workdir: Path,
           params_files: list[Path]) -> Searched:
    """Search on ``records`` (state in ``workdir``), write the best as ``out/model.keras`` with the
    reports and ``trials.csv``; ``params_files`` are named in a params error."""
    common, p = params.train, params.train.automl
    quiet_known_notices()
    seed_everything(p.seed)  # op determinism before any TensorFlow work
    import autokeras
    import keras

    try:
        labels = json.loads((records / "labels.json").read_text())
        size = record_image_size(records)
        train_x, train_y = load_arrays(records, "train", size)
        val_x, val_y = load_arrays(records, "val", size)
        test_x, test_y = load_arrays(records, "test", size)
    except (OSError, json.JSONDecodeError, DatasetError) as exc:
        raise StageError(f"--records {records}: {exc}") from None
    # AutoKeras picks its head like train.head=auto; an impossible explicit head is still refused
    params_head(common.head, len(labels), params_files)
    head = "sigmoid" if len(labels) == 2 else "softmax"
    counts = np.bincount(train_y, minlength=len(labels)).tolist()

    parameters = {"train": {**common.model_dump(include={"strategy", "mixed_precision"}), "automl": p.model_dump()},
                  "image_size": size}
    tracker = start_run(MODEL_NAME, [MODEL_NAME, p.tuner, f"{size}px"], parameters, records, sum(counts))

    # Seeded again once the tracker has started: Neptune draws from Python's generator, which
    # Keras uses to seed its own, so a run with tracking off would otherwise get other weights.
    seed_everything(p.seed)
    if common.mixed_precision:  # after seed_everything, whose clear_session resets the policy
        keras.mixed_precision.set_global_policy("mixed_float16")
    project = workdir / PROJECT
    if p.overwrite and project.exists():
        shutil.rmtree(project)  # a fresh search: the result depends only on the tracked inputs
    strategy = {} if common.strategy == "default" else {"distribution_strategy": strategy_for(common.strategy)}
    classifier = autokeras.ImageClassifier(
        num_classes=len(labels), max_trials=p.max_trials, seed=p.seed, overwrite=p.overwrite,
        directory=str(workdir), project_name=PROJECT, objective="val_loss",
        hyperparameters=search_space(p.block_types, p.fixed), tune_new_entries=True,
        **tuner_for(p.tuner, p.block_types), **strategy)
    seed_each_trial(classifier.tuner.oracle, p.seed)
    recorder = epoch_recorder(classifier.tuner)
    # Our own EarlyStopping also stops AutoKeras from retraining the best model from scratch after
    # the search (it does so when it had to add one itself); KerasTuner keeps each trial's best epoch.
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=p.patience or p.epochs)
    resize = resizer(size, p.input_size)
    val_search = search_pixels(val_x, resize)
    classifier.fit(search_pixels(train_x, resize), targets(train_y, len(labels)), epochs=p.epochs,
                   batch_size=p.batch_size, validation_data=(val_search, targets(val_y, len(labels))),
                   callbacks=[stop, recorder], class_weight=class_weights(counts) if p.class_weighting else None,
                   verbose=2)

    oracle = classifier.tuner.oracle
    rows = trial_rows(oracle)
    best_trial = oracle.get_best_trials(1)[0]
    searched = classifier.export_model()
    model = portable(searched, size, resize)
    def predict(images: np.ndarray) -> np.ndarray:
        return np.concatenate([model.predict_on_batch(images[i:i + p.batch_size].astype(np.float32))
                               for i in range(0, len(images), p.batch_size)])

    outputs = predict(val_x)
    reference = searched.predict(val_search[: p.batch_size], verbose=0)
    if not np.allclose(outputs[: p.batch_size], reference, rtol=0, atol=1e-6):
        raise StageError("the plain-Keras copy of the best AutoKeras model predicts differently; not saving it")

    history = trial_history(recorder, best_trial)
    extra = {"best_trial": int(best_trial.trial_id), "trials_run": len(rows),
             "architecture": best_trial.hyperparameters.values.get(BLOCK_TYPE, ""),
             "search_size": p.input_size or size,
             "best_epoch": int(best_trial.best_step) + 1, "epochs_run": len(history), "head": head,
             "image_size": size}
    write_dict_csv(reports / "trials.csv", rows)
    log_trials(tracker, oracle, recorder, rows)
    # Everything was chosen on val (trials, epochs); test is predicted now, once.
    scores = publish(model, MODEL_NAME, out, reports, labels, Predictions(val_y, outputs),
                     Predictions(test_y, predict(test_x)), history, extra,
                     lambda indices: {i: val_x[i] for i in indices}, tracker)
    tracker.stop()
    return Searched(scores, len(rows), best_trial.trial_id, extra["architecture"], extra["best_epoch"])
