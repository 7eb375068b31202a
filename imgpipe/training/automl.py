"""An AutoKeras architecture search on the packed TFRecords; its winner trained on the whole training split.

``autokeras.ImageClassifier`` tries ``train.automl.max_trials`` models (tuner, epochs per trial,
the architectures to consider and an optional smaller search size come from params.yaml), each
stopped early on validation loss and kept at its best epoch.

AutoKeras 3 takes NumPy arrays only (its adapters refuse tf.data), so the search runs on a sample
held in memory: at most ``train.automl.search_images`` training images, seeded and class-balanced
(``imgpipe.records.read.balanced_sample``, chosen from the labels alone; only the chosen images are
decoded, uint8, image_size^2 * 3 bytes each), and a validation sample of at most as many, chosen
the same way, on which the trials are scored (so, when val is larger, on its classes alike rather
than in val's proportions). The search's memory is the sample's, whatever the
size of the splits. Then the best trial's architecture (its hyperparameters, optimizer and learning
rate, and the normalization statistics its search adapted) is trained afresh on the whole training
split, streamed like the ResNet's (``training_epochs``), validated on the whole val split and kept
at its best epoch. When the sample already held every training and validation image, that would
repeat the search's own training: the best trial's model is kept as it is.

The model is saved as ``model.keras`` in float32 with AutoKeras' own layers swapped for plain Keras
ones, so it loads without AutoKeras; val and test are evaluated streamed. Every trial's
hyperparameters, score and epochs go to ``trials.csv`` and to Neptune; the metrics, plots and
pictures are the ResNet trainer's (``imgpipe.training.reports.publish``).

The search state (KerasTuner's trials and checkpoints, and each finished trial's epochs) lives in
a backup folder under ``--workdir`` keyed by every input (``imgpipe.training.backup``). A killed
run resumes after its last finished trial (the one that was running starts again); each trial is
seeded by its own number, so a resumed search gives the trials an uninterrupted one gives. A
finished run removes the folder.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgpipe.errors import StageError
from imgpipe.files import write_text_atomic
from imgpipe.params import AutomlParams, Params
from imgpipe.records.read import (
    DatasetError,
    balanced_sample,
    load_records_at,
    make_dataset,
    record_image_size,
    split_labels,
    training_epochs,
)
from imgpipe.training import backup
from imgpipe.training.evaluation import Scores
from imgpipe.training.fitting import best_epoch, epoch_logger, images_at, predictions
from imgpipe.training.models import (
    class_weights,
    float32_copy,
    loss_for,
    params_head,
    seed_everything,
    set_precision,
    strategy_for,
    targets_for,
    with_adapted_state,
)
from imgpipe.training.reports import history_row, publish, start_run, write_dict_csv
from imgpipe.training.tracking import Tracker

log = logging.getLogger(__name__)

MODEL_NAME = "autokeras"
PROJECT = "image_classifier"
EPOCHS_FILE = "trial_epochs.json"  # in the backup folder: the per-epoch rows of finished trials
# AutoKeras' hyperparameter names for the ImageBlock's choices (autokeras/blocks/wrapper.py).
BLOCK_TYPE = "image_block_1/block_type"
PRETRAINED = ("res_net_block_1", "xception_block_1", "efficient_net_block_1")


@dataclass(frozen=True)
class Searched:
    scores: Scores  # of the saved (plain Keras) model on the whole val and test splits
    trials_run: int
    best_trial: str  # KerasTuner's own id, as it names the trial (zero-padded)
    architecture: str
    best_epoch: int
    retrained: bool  # trained afresh on the whole training split after the search
    search_images: int  # training images the search held
    train_images: int  # in the whole training split


@dataclass(frozen=True)
class Sample:
    """What the search holds in memory: seeded, class-balanced samples of the train and val splits
    (uint8 images at the packed size, integer labels), and the whole splits' sizes."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    train_counts: list[int]  # images per class in the whole training split
    val_total: int

    @property
    def whole(self) -> bool:
        """The sample is both splits entire: training the winner again would repeat the search."""
        return len(self.train_y) == sum(self.train_counts) and len(self.val_y) == self.val_total


def load_sample(records: Path, size: int, limit: int, seed: int, classes: int) -> Sample:
    """At most ``limit`` images of train and of val, chosen from the labels alone; only those are decoded."""
    train_labels, val_labels = split_labels(records, "train"), split_labels(records, "val")
    train_x, train_y = load_records_at(records, "train", size, balanced_sample(train_labels, limit, seed))
    val_x, val_y = load_records_at(records, "val", size, balanced_sample(val_labels, limit, seed))
    return Sample(train_x, train_y, val_x, val_y, np.bincount(train_labels, minlength=classes).tolist(),
                  len(val_labels))


def tracked_parameters(params: Params, size: int) -> dict:
    """Everything besides the records and the code that the result depends on: the Neptune run's
    parameters, and part of the backup's key."""
    common = params.train
    return {"train": {**common.model_dump(include={"head", "strategy", "precision", "deterministic"}),
                      "automl": common.automl.model_dump()},
            "image_size": size}


def search_strategy(name: str, stage: str):  # type: ignore[no-untyped-def]
    """``train.strategy`` for the search and the winner's training; call it before any other
    TensorFlow work. ``multi_worker`` runs on this machine's own devices: KerasTuner distributes
    a search another way (a chief oracle handing whole trials to worker processes, set up by its
    own environment variables), not by training each trial's model across the machines of
    TF_CONFIG, and this stage sets up neither."""
    if name == "multi_worker":
        log.warning("%s: train.strategy multi_worker: the AutoKeras search does not train across machines; "
                    "it runs on this machine's own devices (default strategy)", stage)
        return strategy_for("default")
    return strategy_for(name)


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


def start_each_trial(tuner, seed: int, precision: str, name: str, max_trials: int) -> None:  # type: ignore[no-untyped-def]
    """At each trial's start: a log line, and Python's, NumPy's and TensorFlow's generators seeded
    by the trial's number, so that its weights and batches do not depend on the trials run
    before it in this process (a resumed search then gives an uninterrupted one's trials).

    KerasTuner clears Keras' session before building each model, which resets the dtype policy:
    ``train.precision`` is set again there."""
    import keras

    run_trial, build = tuner.run_trial, tuner._build_hypermodel  # noqa: SLF001 - KerasTuner's only build hook

    def seeded(trial, *args, **kwargs):  # type: ignore[no-untyped-def]
        log.info("%s: search trial %d of %d", name, int(trial.trial_id) + 1, max_trials)
        keras.utils.set_random_seed((seed + int(trial.trial_id)) % 2**32)
        return run_trial(trial, *args, **kwargs)

    def in_precision(hp):  # type: ignore[no-untyped-def]
        set_precision(precision)  # its warning was logged once, at the start
        return build(hp)

    tuner.run_trial, tuner._build_hypermodel = seeded, in_precision  # noqa: SLF001


def restart_interrupted(oracle) -> None:  # type: ignore[no-untyped-def]
    """Forget what a trial that was running when the last run was killed reported: KerasTuner runs
    it again from its start, and would otherwise average those epochs into the rerun's."""
    for trial in oracle.trials.values():
        if trial.status == "RUNNING":
            trial.metrics = type(trial.metrics)()


def targets(labels: np.ndarray, classes: int) -> np.ndarray:
    """One 0/1 column for two classes (AutoKeras then uses a sigmoid), one-hot rows otherwise."""
    if classes == 2:
        return labels.reshape(-1, 1).astype(np.float32)
    return np.eye(classes, dtype=np.float32)[labels]


def resizer(size: int, search_size: int):  # type: ignore[no-untyped-def]
    """The Resizing layer that maps pack-size images to the search size, or None when they agree.
    float32 whatever ``train.precision``: the search's pixels are computed through it in float32."""
    import keras

    if search_size in (0, size):
        return None
    return keras.layers.Resizing(search_size, search_size, interpolation="bilinear", name="resize", dtype="float32")


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
            return resize if resize is not None else keras.layers.Identity(name=layer.name, dtype="float32")
        return layer  # shared, with its weights and adapted state (Normalization's mean and variance)

    image = keras.Input(shape=(size, size, 3), dtype="float32", name="image")
    inputs = [image] if isinstance(model.input, list) else image
    return keras.models.clone_model(model, input_tensors=inputs, clone_function=clone)


def checked_portable(model, size: int, resize, images: np.ndarray):  # type: ignore[no-untyped-def]
    """``portable(model)``, refused unless it predicts what ``model`` predicts on ``images`` (a few
    uint8 pack-size images; ``model`` sees them through ``resize``, as in the search)."""
    plain = portable(model, size, resize)
    reference = model.predict_on_batch(search_pixels(images, resize))
    if not np.allclose(plain.predict_on_batch(images.astype(np.float32)), reference, rtol=0, atol=1e-6):
        raise StageError("the plain-Keras copy of the best AutoKeras model predicts differently; not saving it")
    return plain


def adapted_layers(model) -> list:  # type: ignore[no-untyped-def]
    """The layers whose state AutoKeras adapts to the search's training images, in model order."""
    import keras

    return [layer for layer in model.layers if isinstance(layer, keras.layers.Normalization)]


def trial_optimizer(values: dict, steps: int):  # type: ignore[no-untyped-def]
    """The optimizer AutoKeras compiled the trial with (autokeras/graph.py, ``_compile_keras_model``):
    ``optimizer`` and ``learning_rate`` from its hyperparameters. ``adam_weight_decay`` decays its
    rate to 0 over this fit's ``steps`` (AutoKeras' intent; its own count is one step per epoch)."""
    import keras

    name, rate = values.get("optimizer", "adam"), values.get("learning_rate", 1e-3)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=rate)
    if name == "adam_weight_decay":
        schedule = keras.optimizers.schedules.PolynomialDecay(initial_learning_rate=rate, decay_steps=steps,
                                                              end_learning_rate=0.0)
        return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=0.01, beta_1=0.9, beta_2=0.999,
                                      epsilon=1e-6)
    return keras.optimizers.Adam(learning_rate=rate)


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


def epoch_recorder(tuner, saved: Path):  # type: ignore[no-untyped-def]
    """A Keras callback recording every trial's per-epoch numbers, keyed by trial id, kept in
    ``saved`` across runs (KerasTuner itself keeps only each trial's best epoch).

    KerasTuner gives every trial a deep copy of the callbacks; this one returns itself from
    ``__deepcopy__`` so all trials share it, and learns the running trial's id by wrapping
    ``tuner.run_trial``. The rows are written as each trial ends, before KerasTuner records the
    end: a run killed in between runs the trial again, and its rows start afresh."""
    import keras

    class EpochRecorder(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.trials: dict[str, list[dict]] = json.loads(saved.read_text()) if saved.exists() else {}
            self.current = ""

        def __deepcopy__(self, memo: dict) -> EpochRecorder:
            return self

        def on_train_begin(self, logs: dict | None = None) -> None:
            self.trials[self.current] = []  # a retried fit starts the trial's history again

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.trials[self.current].append(history_row(epoch + 1, logs or {}))

    recorder = EpochRecorder()
    run_trial, end_trial = tuner.run_trial, tuner.on_trial_end

    def tracked(trial, *args, **kwargs):  # type: ignore[no-untyped-def]
        recorder.current = trial.trial_id
        return run_trial(trial, *args, **kwargs)

    def ended(trial) -> None:  # type: ignore[no-untyped-def]
        write_text_atomic(saved, json.dumps(recorder.trials, sort_keys=True) + "\n")
        end_trial(trial)

    tuner.run_trial, tuner.on_trial_end = tracked, ended
    return recorder


def trial_history(recorder, trial) -> list[dict]:  # type: ignore[no-untyped-def]
    """Per-epoch loss/accuracy of one trial (none for a trial that failed before its first epoch)."""
    return recorder.trials.get(trial.trial_id, [])


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
    KerasTuner reloads a trial's weights without its optimizer state; TensorFlow warns of
    "excessive retracing" when a few models in a row each trace their first steps (it counts
    the traces of every model's step function together), as a search on few steps per trial
    does before the winner's training: all expected, none actionable, and they would bury the
    search's own lines."""
    warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match", category=UserWarning)
    warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer", category=UserWarning)
    logging.getLogger("tensorflow").addFilter(not_retracing)  # the same function each time: added once


def not_retracing(record: logging.LogRecord) -> bool:
    return "triggered tf.function retracing" not in record.getMessage()


def run_search(p: AutomlParams, classes: int, sample: Sample, resize, folder: Path,  # type: ignore[no-untyped-def]
               distribution: dict, precision: str, name: str):
    """The AutoKeras search on ``sample``, its state in ``folder`` (resumed from there when a
    killed run left it), ``distribution`` KerasTuner's strategy argument; returns the classifier
    and the epoch recorder."""
    import autokeras
    import keras

    classifier = autokeras.ImageClassifier(
        num_classes=classes, max_trials=p.max_trials, seed=p.seed, overwrite=False,
        directory=str(folder), project_name=PROJECT, objective="val_loss",
        hyperparameters=search_space(p.block_types, p.fixed), tune_new_entries=True,
        **tuner_for(p.tuner, p.block_types), **distribution)
    tuner = classifier.tuner
    if tuner.oracle.trials:  # KerasTuner reloaded the trials of a killed run
        log.info("%s: resuming the search after trial %d of %d from %s",
                 name, len(tuner.oracle.end_order), p.max_trials, folder)
        restart_interrupted(tuner.oracle)
    seed_each_trial(tuner.oracle, p.seed)
    start_each_trial(tuner, p.seed, precision, name, p.max_trials)
    recorder = epoch_recorder(tuner, folder / EPOCHS_FILE)
    # Our own EarlyStopping also stops AutoKeras from retraining the best model from scratch after
    # the search (it does so when it had to add one itself); KerasTuner keeps each trial's best epoch.
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=p.patience or p.epochs)
    counts = np.bincount(sample.train_y, minlength=classes).tolist()
    classifier.fit(search_pixels(sample.train_x, resize), targets(sample.train_y, classes), epochs=p.epochs,
                   batch_size=p.batch_size,
                   validation_data=(search_pixels(sample.val_x, resize), targets(sample.val_y, classes)),
                   callbacks=[stop, recorder], class_weight=class_weights(counts) if p.class_weighting else None,
                   verbose=2)
    return classifier, recorder


def retrain(classifier, best_trial, searched, sample: Sample, records: Path, size: int, resize,  # type: ignore[no-untyped-def]
            params: Params, strategy, head: str, val_data, tracker: Tracker):
    """The best trial's architecture trained afresh on the whole training split, streamed, kept at
    its best val-loss epoch; returns (plain Keras model, history, best epoch).

    Built by AutoKeras from the trial's hyperparameters, with the Normalization statistics the
    searched model adapted (recomputing them would take a pass over the whole split, and the
    search's are a fair estimate), compiled with the trial's optimizer and learning rate, and
    trained without pipeline augmentation: the trial's own augmentation layers are in the model."""
    common, p = params.train, params.train.automl
    statistics = [layer.get_weights() for layer in adapted_layers(searched)]
    seed_everything(p.seed, common.deterministic)
    set_precision(common.precision)  # after seed_everything, whose clear_session resets it
    train_images = sum(sample.train_counts)
    steps = -(-train_images // p.batch_size)
    with strategy.scope():
        built = classifier.tuner.hypermodel.build(best_trial.hyperparameters)
        for layer, weights in zip(adapted_layers(built), statistics, strict=True):
            layer.set_weights(weights)
        model = checked_portable(with_adapted_state(built), size, resize, sample.val_x[: p.batch_size])
        model.compile(optimizer=trial_optimizer(best_trial.hyperparameters.values, steps * p.epochs),
                      loss=loss_for(head), metrics=["accuracy"])
    to_targets = targets_for(head, len(sample.train_counts))
    history: list[dict] = []
    best = best_epoch(p.patience)
    model.fit(training_epochs(records, p.batch_size, size, p.seed, 0, p.epochs).map(to_targets),
              epochs=p.epochs, steps_per_epoch=steps, validation_data=val_data.map(to_targets),
              class_weight=class_weights(sample.train_counts) if p.class_weighting else None,
              callbacks=[epoch_logger(tracker, history), best], verbose=2)
    best.restore_best(model)
    return model, history, best.best_epoch


def search(params: Params, records: Path, out: Path, reports: Path, workdir: Path,
           params_files: list[Path], name: str) -> Searched:
    """Search on ``records`` (state backed up under ``workdir``), train the winner on the whole
    training split unless the search saw all of it, write it as ``out/model.keras`` with the
    reports and ``trials.csv``; ``params_files`` are named in a params error, ``name`` starts
    the log lines."""
    common, p = params.train, params.train.automl
    strategy = search_strategy(common.strategy, name)  # first: before any other TensorFlow work
    seed_everything(p.seed, common.deterministic)
    warning = set_precision(common.precision)
    if warning:
        log.warning("%s: %s", name, warning)
    quiet_known_notices()

    try:
        labels = json.loads((records / "labels.json").read_text())
        size = record_image_size(records)
        # Val and test are checksummed here, train as its labels are read.
        val_data = make_dataset(records, "val", p.batch_size, size, training=False)
        test_data = make_dataset(records, "test", p.batch_size, size, training=False)
        sample = load_sample(records, size, p.search_images, p.seed, len(labels))
    except (OSError, json.JSONDecodeError, DatasetError) as exc:
        raise StageError(f"--records {records}: {exc}") from None
    # AutoKeras picks its head like train.head=auto; an impossible explicit head is still refused
    params_head(common.head, len(labels), params_files)
    head = "sigmoid" if len(labels) == 2 else "softmax"
    train_images = sum(sample.train_counts)
    log.info("%s: the search holds %d of %d training and %d of %d validation images (train.automl.search_images %d)",
             name, len(sample.train_y), train_images, len(sample.val_y), sample.val_total, p.search_images)

    parameters = tracked_parameters(params, size)
    folder = backup.backup_folder(workdir, backup.inputs_key(parameters, backup.training_inputs(records)), name)
    tracker = start_run(MODEL_NAME, [MODEL_NAME, p.tuner, f"{size}px"], parameters, records, train_images)
    resize = resizer(size, p.input_size)
    distribution = {"distribution_strategy": strategy} if common.strategy == "mirrored" else {}
    classifier, recorder = run_search(p, len(labels), sample, resize, folder, distribution, common.precision, name)

    oracle = classifier.tuner.oracle
    rows = trial_rows(oracle)
    best_trial = oracle.get_best_trials(1)[0]
    searched = classifier.export_model()
    if sample.whole:
        log.info("%s: the search saw every training and validation image: keeping trial %s as searched",
                 name, best_trial.trial_id)
        model = checked_portable(searched, size, resize, sample.val_x[: p.batch_size])
        history, kept_epoch = trial_history(recorder, best_trial), int(best_trial.best_step) + 1
    else:
        log.info("%s: training trial %s's architecture afresh on all %d training images (the search saw %d)",
                 name, best_trial.trial_id, train_images, len(sample.train_y))
        model, history, kept_epoch = retrain(classifier, best_trial, searched, sample, records, size, resize,
                                             params, strategy, head, val_data, tracker)
    set_precision("float32")  # training is over: what this process builds or loads next is float32
    model = float32_copy(model)  # what is evaluated and saved, whatever precision trained it

    extra = {"best_trial": int(best_trial.trial_id), "trials_run": len(rows),
             "architecture": best_trial.hyperparameters.values.get(BLOCK_TYPE, ""),
             "search_size": p.input_size or size, "search_images": len(sample.train_y),
             "search_val_images": len(sample.val_y), "retrained": not sample.whole,
             "best_epoch": kept_epoch, "epochs_run": len(history), "head": head, "image_size": size}
    write_dict_csv(reports / "trials.csv", rows)
    log_trials(tracker, oracle, recorder, rows)
    # Everything was chosen on val (trials, epochs); test is predicted now, once.
    scores = publish(model, MODEL_NAME, out, reports, labels, predictions(model, val_data),
                     predictions(model, test_data), history, extra, images_at(val_data), tracker)
    tracker.stop()
    backup.remove(folder)
    return Searched(scores, len(rows), best_trial.trial_id, extra["architecture"], kept_epoch, not sample.whole,
                    len(sample.train_y), train_images)
