"""Training past one machine: ``tf.distribute.MultiWorkerMirroredStrategy`` from ``TF_CONFIG``.

Every worker runs the same ``modelloop train SPEC --distributed`` command. TensorFlow
reads the cluster from the ``TF_CONFIG`` environment variable; on Kubernetes an Indexed
Job gives each pod ``JOB_COMPLETION_INDEX`` and ``--tf-config-from-index`` turns it and
``MODELLOOP_WORKER_HOSTS`` into ``TF_CONFIG`` (k8s/training/). Worker 0 is the chief: it
alone writes the run directory; the others train into a scratch directory that is
deleted afterwards, because every worker must run the same steps (the gradients are
all-reduced) but only one copy of the result is wanted.

Example:

```python
env = {"MODELLOOP_WORKER_HOSTS": "w-0.train:2222,w-1.train:2222", "JOB_COMPLETION_INDEX": "1"}
tf_config_from_index(env)
# {"cluster": {"worker": ["w-0.train:2222", "w-1.train:2222"]}, "task": {"type": "worker", "index": 1}}
```
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelloop.errors import ModelloopError
from modelloop.layout import RUN_MODEL_FILE

WORKER_HOSTS_ENV = "MODELLOOP_WORKER_HOSTS"
INDEX_ENV = "JOB_COMPLETION_INDEX"


class DistributedConfigError(ModelloopError):
    """TF_CONFIG (or what it is derived from) is missing or malformed."""


@dataclass(frozen=True)
class WorkerRole:
    """This process's place in the cluster.

    Attributes:
        index: The worker's index in ``cluster.worker``.
        num_workers: How many workers train together.
    """

    index: int
    num_workers: int

    @property
    def is_chief(self) -> bool:
        """Worker 0 writes the run directory (TensorFlow's convention without a chief task)."""
        return self.index == 0


def tf_config_from_index(env: Mapping[str, str]) -> dict[str, Any]:
    """Builds ``TF_CONFIG`` from ``MODELLOOP_WORKER_HOSTS`` and ``JOB_COMPLETION_INDEX``.

    Args:
        env: The environment; ``MODELLOOP_WORKER_HOSTS`` is a comma-separated list of
            ``host:port`` in worker order, ``JOB_COMPLETION_INDEX`` this worker's index.

    Returns:
        The ``TF_CONFIG`` dictionary.

    Raises:
        DistributedConfigError: A variable is missing or the index is out of range.
    """
    hosts = [h.strip() for h in env.get(WORKER_HOSTS_ENV, "").split(",") if h.strip()]
    if not hosts:
        raise DistributedConfigError(f"--tf-config-from-index needs {WORKER_HOSTS_ENV} (host:port,...)")
    for host in hosts:
        if ":" not in host:
            raise DistributedConfigError(f"{WORKER_HOSTS_ENV}: {host!r} is not host:port")
    raw = env.get(INDEX_ENV)
    if raw is None:
        raise DistributedConfigError(f"--tf-config-from-index needs {INDEX_ENV} (set by an Indexed Job)")
    try:
        index = int(raw)
    except ValueError:
        raise DistributedConfigError(f"{INDEX_ENV}={raw!r} is not an integer") from None
    if not 0 <= index < len(hosts):
        raise DistributedConfigError(f"{INDEX_ENV}={index} is outside the {len(hosts)} workers")
    return {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}


def worker_role(env: Mapping[str, str]) -> WorkerRole:
    """Reads this worker's index and the worker count from ``TF_CONFIG``.

    Raises:
        DistributedConfigError: ``TF_CONFIG`` is missing, not JSON, or has no worker task.
    """
    raw = env.get("TF_CONFIG")
    if not raw:
        raise DistributedConfigError(
            "--distributed needs TF_CONFIG (or --tf-config-from-index on an Indexed Job)"
        )
    try:
        config = json.loads(raw)
        workers = config["cluster"]["worker"]
        task = config["task"]
        index = int(task["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DistributedConfigError(f"TF_CONFIG is malformed: {type(exc).__name__}: {exc}") from None
    if task.get("type") != "worker":
        raise DistributedConfigError(
            f"TF_CONFIG task type {task.get('type')!r}: MultiWorkerMirroredStrategy runs workers only"
        )
    if not isinstance(workers, list) or not 0 <= index < len(workers):
        raise DistributedConfigError(f"TF_CONFIG task index {index} is outside cluster.worker")
    return WorkerRole(index=index, num_workers=len(workers))


def weights_digest(model: Any) -> str:
    """SHA-256 over a model's weights, in order: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(str(weight.dtype).encode())
        digest.update(str(weight.shape).encode())
        digest.update(weight.tobytes())
    return digest.hexdigest()


def fit_distributed(
    model: Any,
    strategy: Any,
    x_train: Any,
    y_train: Any,
    x_val: Any,
    y_val: Any,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    on_epoch_end: Any | None = None,
) -> dict[str, list[float]]:
    """Trains ``model`` data-parallel under ``strategy`` with a custom step loop.

    Keras 3's ``Model.fit`` cannot run under ``MultiWorkerMirroredStrategy`` (its
    symbolic build reduces the whole data batch, which the collective ops reject:
    keras-team/keras#20585), so the step is written out: each worker takes its shard
    of every global batch, the loss is scaled by 1 / replicas, and the Keras optimizer
    all-reduces (sums) the gradients, so every worker applies the same update. There is
    no early stopping: a worker that stopped alone would leave the others waiting in
    the all-reduce.

    Args:
        model: A compiled Keras model whose variables were created in ``strategy.scope()``.
        strategy: The ``tf.distribute`` strategy.
        x_train: Training features (numpy).
        y_train: Training targets (numpy).
        x_val: Validation features, scored on every worker after each epoch.
        y_val: Validation targets.
        epochs: Epochs to run, all of them.
        batch_size: Global batch size, split across the workers.
        seed: Shuffle seed; the same on every worker, so the shards never overlap.
        on_epoch_end: Called as ``on_epoch_end(epoch, logs)`` after each epoch.

    Returns:
        The history, ``{"loss": [...], "val_loss": [...]}``, one value per epoch.
    """
    import tensorflow as tf

    loss_fn = model.loss
    replicas = strategy.num_replicas_in_sync
    dataset = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size, drop_remainder=True)
    )
    options = tf.data.Options()
    # In-memory arrays have no files to split: shard by element.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    distributed = strategy.experimental_distribute_dataset(dataset.with_options(options))

    def replica_step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            prediction = model(x, training=True)
            # Mean over this worker's shard; the gradient all-reduce sums the replicas.
            loss = loss_fn(y, prediction) + tf.add_n([0.0, *model.losses])
            scaled = loss / replicas
        grads = tape.gradient(scaled, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    @tf.function
    def train_step(x: Any, y: Any) -> Any:
        per_replica = strategy.run(replica_step, args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

    history: dict[str, list[float]] = {"loss": [], "val_loss": []}
    for epoch in range(epochs):
        losses = [float(train_step(x, y)) for x, y in distributed]
        # The weights are identical on every worker, so each scores validation alone.
        val_loss = float(loss_fn(y_val, model(x_val, training=False)))
        history["loss"].append(sum(losses) / max(len(losses), 1))
        history["val_loss"].append(val_loss)
        if on_epoch_end is not None:
            on_epoch_end(epoch, {"loss": history["loss"][-1], "val_loss": val_loss})
    return history


def train_distributed(
    spec_ref: str,
    out: Path,
    *,
    epochs: int | None,
    seed: int,
    folds: int = 0,
    from_index: bool = False,
    env: MutableMapping[str, str] | None = None,
) -> int:
    """``modelloop train SPEC --distributed``: one worker's part of a multi-worker run.

    Every worker runs this with the same arguments. The chief (worker 0) writes the run
    directory ``out``; the others train into a scratch directory, deleted afterwards.
    Each worker prints the SHA-256 of its trained weights, so a launcher (or a test) can
    check that all workers ended with the same model.

    Args:
        spec_ref: A built-in spec name or a spec file.
        out: The run directory the chief creates.
        epochs: Epochs to run (all of them: no early stopping). Defaults to the spec's.
        seed: Seed of the split, the initial weights and the shuffle; the same everywhere.
        folds: Must be 0: cross-validation is not distributed.
        from_index: Derive ``TF_CONFIG`` from ``JOB_COMPLETION_INDEX`` and
            ``MODELLOOP_WORKER_HOSTS`` first (Kubernetes Indexed Job).
        env: The environment to read and update. Defaults to ``os.environ``.

    Returns:
        The exit status, 0.

    Raises:
        ModelloopError: Bad arguments or a bad cluster configuration.
    """
    env = os.environ if env is None else env
    if folds:
        raise DistributedConfigError("--folds cannot be combined with --distributed")
    if from_index:
        env["TF_CONFIG"] = json.dumps(tf_config_from_index(env))
    role = worker_role(env)
    from modelloop.training.spec import load_spec

    spec = load_spec(spec_ref)
    import tensorflow as tf

    # Must exist before any other TensorFlow op runs; it reads TF_CONFIG and blocks
    # until every worker has joined the cluster.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    from modelloop.training.train import train

    scratch = None if role.is_chief else Path(tempfile.mkdtemp(prefix="modelloop-worker-"))
    run_dir = out if scratch is None else scratch / "run"
    try:
        result = train(spec, run_dir, epochs=epochs, seed=seed, interactive=False, strategy=strategy)
        import keras

        digest = weights_digest(keras.saving.load_model(result.run_dir / RUN_MODEL_FILE))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    metric = result.metrics["main_metric"]
    print(
        f"worker {role.index}/{role.num_workers}: trained {spec.name}, test {metric} "
        f"{result.metrics['test'][metric]:.4f}; weights sha256 {digest}",
        flush=True,
    )
    print(out if role.is_chief else f"worker {role.index}: the run directory is written by worker 0")
    return 0
