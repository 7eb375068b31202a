"""Training on several machines with ``tf.distribute.MultiWorkerMirroredStrategy`` (``train.strategy:
multi_worker``): every worker runs the same command with its own ``TF_CONFIG``, every step is a
collective, and only the chief writes.

Keras 3.12 has two bugs on this strategy, both worked around here and nowhere else: its ``fit``
reduces the first batch as one tuple, and it averages each step's scalar logs along an axis they
do not have (the first is keras-team/keras#20585, open). Both workarounds reach into Keras'
private API, so they are pinned to Keras 3.12 with it, and apply only under ``multi_worker``.
"""

from __future__ import annotations

import tensorflow as tf


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """The worker that writes models, reports and tracking (worker 0, TensorFlow's convention);
    true for every other strategy."""
    return bool(strategy.extended.should_checkpoint)


def by_element(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Shard across workers by element: each worker takes its part of every global batch, so the
    batches are the ones a single worker would train on. (Sharding by file, TensorFlow's default
    for TFRecords, needs at least as many shards per split as workers and changes the batches.)"""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def prepare(model, strategy: tf.distribute.Strategy) -> None:  # type: ignore[no-untyped-def]
    """Make ``model.fit`` work on several workers and train the model a single worker would."""
    _reduce_first_batch_tensor_by_tensor(model, strategy)
    _average_scalar_logs()
    synchronize_batch_norm(model, True)


def synchronize_batch_norm(model, on: bool) -> None:  # type: ignore[no-untyped-def]
    """Batch statistics over the global batch while training (otherwise each worker keeps moving
    averages of its own half, and the chief would save only its own); off again before saving,
    so the saved configuration is a single worker's."""
    import keras

    for layer in model._flatten_layers(include_self=False, recursive=True):  # noqa: SLF001
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = on


def agreed_epoch(strategy: tf.distribute.Strategy, epoch: int) -> int:
    """The epoch every worker resumes after: each worker keeps its own backup, and a resume is
    only safe when all of them hold the same epoch; otherwise all start afresh (0)."""
    if not is_multi_worker(strategy):
        return epoch
    mine = tf.constant([float(epoch), float(epoch) ** 2, 1.0])

    @tf.function  # a collective, traced as TensorFlow wants distributed calls to be
    def summed() -> tf.Tensor:
        return strategy.reduce("SUM", strategy.run(lambda: tf.identity(mine)), axis=None)

    total = summed().numpy()
    # All equal exactly when n * sum(e^2) == sum(e)^2 (Cauchy-Schwarz), whatever the worker.
    return epoch if total[2] * total[1] == total[0] ** 2 else 0


def _reduce_first_batch_tensor_by_tensor(model, strategy) -> None:  # type: ignore[no-untyped-def]
    """Keras 3.12's fit builds the model from its first (x, y, weights) batch reduced in one
    ``strategy.reduce`` call, which MultiWorkerMirroredStrategy cannot do with a tuple
    (keras-team/keras#20585): reduce each tensor on its own, then build as Keras would."""
    build = model._maybe_symbolic_build  # noqa: SLF001

    def per_tensor(iterator=None, data_batch=None):  # type: ignore[no-untyped-def]
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), next(batches))
                break
        build(data_batch=data_batch)

    model._maybe_symbolic_build = per_tensor  # noqa: SLF001


def _average_scalar_logs() -> None:
    """Keras 3.12 averages each step's logs over workers with ``strategy.reduce("MEAN", v,
    axis=0)``, which fails on the scalar loss and metrics: average them whole (axis None)."""
    from keras.src.backend.tensorflow import trainer

    original = trainer.reduce_per_replica
    if getattr(original, "scalar_safe", False):
        return

    def reduce(values, strategy, reduction):  # type: ignore[no-untyped-def]
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):  # noqa: SLF001
            return trainer.tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    reduce.scalar_safe = True  # type: ignore[attr-defined]
    trainer.reduce_per_replica = reduce
