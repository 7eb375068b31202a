"""Training ResNet50V2 on the packed TFRecords, from scratch or from a weights file.

Keeps the weights of the epoch with the lowest validation loss, not the last, then evaluates them
on val and, once, on the held-out test split. Writes the model
(``model.keras``, byte-reproducible), DVC metrics and plots (``metrics.json``, ``history.csv``,
``confusion.csv``) and pictures (curves, confusion matrix, most confident mistakes), and records
the run in Neptune (offline unless NEPTUNE_MODE says otherwise).

Survives being killed: every finished epoch is backed up (``imgpipe.training.backup``), each
epoch's data comes from a seed of its own (``imgpipe.records.read.training_epochs``), and a rerun
resumes to the very model an uninterrupted run makes. Runs on one device, on all local ones
(``mirrored``) or on several machines (``multi_worker``, see ``imgpipe.training.workers``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from imgpipe.errors import StageError
from imgpipe.params import Params, ResnetParams
from imgpipe.records.read import (
    DatasetError,
    count_records,
    label_counts,
    make_dataset,
    record_image_size,
    shard_files,
    training_epochs,
)
from imgpipe.training import backup, workers
from imgpipe.training.evaluation import Scores, evaluate
from imgpipe.training.fitting import best_epoch, epoch_backup, epoch_logger, images_at, log_epoch, predictions
from imgpipe.training.models import (
    backbone,
    build_resnet,
    class_weights,
    float32_copy,
    load_backbone_weights,
    loss_for,
    params_head,
    seed_everything,
    set_precision,
    strategy_for,
    targets_for,
)
from imgpipe.training.reports import publish, start_run
from imgpipe.training.tracking import Tracker

log = logging.getLogger(__name__)

MODEL_NAME = "resnet50v2"
WEIGHTS = ("none", "imagenet")  # train.resnet.weights that are not a file


@dataclass(frozen=True)
class Trained:
    scores: Scores  # on the whole val and test splits, with the best epoch's weights
    best_epoch: int
    epochs_run: int


def learning_rate(p: ResnetParams, steps: int, warmup_steps: int):  # type: ignore[no-untyped-def]
    """``p.learning_rate``, reached linearly over ``warmup_steps``, then constant or cosine-decayed
    to 0 by the end of ``steps`` (all the steps of this fit, warm-up included)."""
    import keras

    schedules = keras.optimizers.schedules
    decay_steps = max(1, steps - warmup_steps)
    if not warmup_steps:
        return schedules.CosineDecay(p.learning_rate, decay_steps) if p.schedule == "cosine" else p.learning_rate
    # alpha=1: the "decay" ends where it starts, i.e. constant after the warm-up.
    return schedules.CosineDecay(0.0, decay_steps, alpha=0.0 if p.schedule == "cosine" else 1.0,
                                 warmup_target=p.learning_rate, warmup_steps=warmup_steps)


def passes_per_epoch(steps_per_pass: int, epochs: int, min_steps: int) -> int:
    """Passes over the training split in one epoch: one, or as many as it takes for ``epochs``
    epochs to make at least ``min_steps`` optimizer steps (``train.resnet.min_steps``)."""
    return max(1, -(-min_steps // (steps_per_pass * epochs)))


def optimizer_for(p: ResnetParams, steps: int, warmup_steps: int = 0):  # type: ignore[no-untyped-def]
    import keras

    rate = learning_rate(p, steps, warmup_steps)
    if p.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=0.9, weight_decay=p.weight_decay or None)
    if p.weight_decay:
        return keras.optimizers.AdamW(rate, weight_decay=p.weight_decay)
    return keras.optimizers.Adam(rate)


def phases(p: ResnetParams) -> list[tuple[int, int, bool]]:
    """The fits of a run as (first epoch, end epoch, backbone frozen): with weights and
    ``freeze_epochs``, the new head alone first, on the loaded backbone (its batch norm in
    inference), then everything; otherwise one fit of all the layers."""
    frozen = min(p.freeze_epochs, p.epochs) if p.weights != "none" else 0
    return [phase for phase in ((0, frozen, True), (frozen, p.epochs, False)) if phase[1] > phase[0]]


def resume_point(strategy, folder: Path, name: str, epochs: int) -> dict | None:  # type: ignore[no-untyped-def]
    """The backed-up state to resume from, or None to start afresh: nothing (whole) is backed up,
    or the workers of a multi_worker run do not all hold the same epoch."""
    state = backup.load_state(folder)
    if workers.agreed_epoch(strategy, state["epoch"] if state else 0) == 0:
        return None
    log.info("%s: resuming after epoch %d of %d from %s", name, state["epoch"], epochs, folder)
    return state


def train(params: Params, records: Path, out: Path, reports: Path, params_files: list[Path], name: str,
          workdir: Path) -> Trained:
    """Train on ``records``, write ``out/model.keras`` and the reports; ``params_files`` are named
    in a params error, ``name`` starts the log lines. Each finished epoch is backed up under
    ``workdir`` (see ``imgpipe.training.backup``); a rerun with the same inputs resumes there."""
    common, p = params.train, params.train.resnet
    strategy = strategy_for(common.strategy)  # first: multi_worker must configure TensorFlow at startup
    seed_everything(p.seed, common.deterministic)

    try:
        labels = json.loads((records / "labels.json").read_text())
        size = record_image_size(records)
        # Every split is checksummed here, before anything else reads them.
        count_records(shard_files(records, "train"))
        val_data = make_dataset(records, "val", p.batch_size, size, training=False)
        test_data = make_dataset(records, "test", p.batch_size, size, training=False)
        counts = label_counts(records, "train", len(labels))
    except (OSError, json.JSONDecodeError, DatasetError) as exc:
        raise StageError(f"--records {records}: {exc}") from None
    head = params_head(common.head, len(labels), params_files)
    to_targets = targets_for(head, len(labels))
    steps_per_pass = -(-sum(counts) // p.batch_size)
    passes = passes_per_epoch(steps_per_pass, p.epochs, p.min_steps)
    steps_per_epoch = passes * steps_per_pass
    if passes > 1:  # each pass reshuffles and draws fresh augmentation
        log.info("%s: %d training images: each epoch is %d passes, %d steps in all (train.resnet.min_steps %d)",
                 name, sum(counts), passes, steps_per_epoch * p.epochs, p.min_steps)

    def training(first: int, end: int):  # type: ignore[no-untyped-def]
        data = training_epochs(records, p.batch_size, size, p.seed, first, end, passes,
                               params.augment if p.augment else None).map(to_targets)
        return workers.by_element(data) if workers.is_multi_worker(strategy) else data

    if workers.is_multi_worker(strategy):
        val_data, test_data = workers.by_element(val_data), workers.by_element(test_data)
    chief = workers.is_chief(strategy)
    parameters = {"train": common.model_dump(exclude={"automl"}), "augment": params.augment.model_dump(),
                  "image_size": size}
    tracker = (start_run(MODEL_NAME, [MODEL_NAME, head, f"{size}px"], parameters, records, sum(counts))
               if chief else Tracker.idle())

    # Seeded again once the tracker has started: Neptune draws from Python's generator, which
    # Keras uses to seed its own, so a run with tracking off would otherwise get other weights.
    seed_everything(p.seed, common.deterministic)
    warning = set_precision(common.precision)  # after seed_everything, whose clear_session resets it
    if warning:
        log.warning("%s: %s", name, warning)
    if common.strategy != "default":
        log.info("%s: %s (%s) with %d replica(s)", name, common.strategy, type(strategy).__name__,
                 strategy.num_replicas_in_sync)
    with strategy.scope():
        model = build_resnet(size, len(labels), head, p.dropout, p.batchnorm_momentum)
        load_backbone_weights(model, p.weights, params_files)
    if workers.is_multi_worker(strategy):
        workers.prepare(model, strategy)

    key = backup.inputs_key({**parameters, "replicas": strategy.num_replicas_in_sync},
                            backup.training_inputs(records, [Path(p.weights)] if p.weights not in WEIGHTS else []))
    folder = backup.backup_folder(workdir, key, name)
    state = resume_point(strategy, folder, name, p.epochs)
    history: list[dict] = []
    best = best_epoch(p.patience)
    stopped = False
    for index, (first, end, frozen) in enumerate(phases(p)):
        if state and state["phase"] > index:
            continue  # a phase the interrupted run finished
        backbone(model).trainable = not frozen
        epochs = end - first
        warmup = 0 if frozen else p.warmup_epochs * steps_per_epoch
        best.start_phase()
        begin = first
        with strategy.scope():  # the optimizer's variables, built here or by a restore, are the strategy's
            model.compile(optimizer=optimizer_for(p, epochs * steps_per_epoch, warmup),
                          loss=loss_for(head, p.label_smoothing), metrics=["accuracy"])
            restored = backup.restore_epoch(folder, model, state) if state and state["phase"] == index else None
        if state and state["phase"] == index:  # put back the last finished epoch of this phase
            best.load(state, restored)
            history[:] = state["history"]
            for row in history:  # a resumed run's Neptune run still gets every epoch
                log_epoch(tracker, row)
            begin, stopped = state["epoch"], state["stopped"]
            state = None
        if begin < end and not stopped:
            model.fit(training(begin, end), steps_per_epoch=steps_per_epoch, epochs=end, initial_epoch=begin,
                      validation_data=val_data.map(to_targets),
                      class_weight=class_weights(counts) if p.class_weighting else None,
                      callbacks=[epoch_logger(tracker, history), best, epoch_backup(folder, index, history, best)],
                      verbose=2)
            stopped = model.stop_training
        if stopped:
            break
    best.restore_best(model)

    # The best epoch's weights were chosen on val; now val and, once, test are evaluated with them.
    if workers.is_multi_worker(strategy):
        workers.synchronize_batch_norm(model, False)
    set_precision("float32")  # training is over: what this process builds or loads next is float32
    model = float32_copy(model)  # what is evaluated and saved, whatever precision trained it
    extra = {"best_epoch": best.best_epoch, "epochs_run": len(history), "head": head, "image_size": size,
             "weights": p.weights if p.weights in WEIGHTS else Path(p.weights).name}
    val, test = predictions(model, val_data), predictions(model, test_data)  # every worker: collective
    if chief:
        scores = publish(model, MODEL_NAME, out, reports, labels, val, test, history, extra, images_at(val_data),
                         tracker)
    else:  # the chief writes; the others only report what they computed
        scores = Scores(evaluate(val.y_true, val.outputs, labels), evaluate(test.y_true, test.outputs, labels))
    tracker.stop()
    backup.remove(folder)  # finished: nothing left to resume
    return Trained(scores, best.best_epoch, len(history))
