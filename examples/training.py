"""The training loop shared by the example trainers (CIFAR-10 images, Penn Treebank language models).

A trainer describes its problem as a :class:`Task` (model, batches, loss, evaluation) and a config
derived from :class:`LoopConfig`; :func:`train` does the rest, the same way for every task:

- the optimizer from the one registry, ``examples.optimizers.make_optimizer``, its learning rate
  logged per epoch;
- one jitted, functional train step (``nnx.split``/``nnx.merge``) built from the task's loss, with
  the batch sharded over the ``data`` axis of a ``jax.make_mesh`` mesh and the model and optimizer
  state replicated, so the same code runs on one CPU or many accelerators;
- a per-epoch carried state (an LSTM's hidden state; ``None`` for feed-forward tasks) that is reset at
  the start of each epoch and threaded through the steps without gradient;
- an epoch-end evaluation that the task drives (a test set, or whole valid/test token streams);
- ``WORKDIR/metrics.jsonl`` (one JSON object per epoch, see :mod:`examples.metrics`), a progress bar,
  an Orbax checkpoint after every epoch and exact resumption, a stop on a non-finite loss that keeps
  the last good checkpoint, and the same numbers for the same seed.

Randomness is derived, never carried: epoch ``e`` uses ``fold_in(fold_in(root, 1), e)`` for its
batches and ``fold_in(that, step)`` inside each step, so a resumed run replays exactly what an
uninterrupted one would have done.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from examples import metrics, optimizers

Batch = Any  # a pytree of arrays whose leading axis is the batch (sharded over "data")
Carry = Any  # a pytree of arrays whose leading axis is the batch, or None
Sums = dict[str, jax.Array]  # per-step metric sums, e.g. {"loss": sum, "correct": n, "count": n}

DATA_AXIS = "data"
# Config fields that may change between a run and its resumption without changing its results.
RESUMABLE_FIELDS = frozenset(
  {"resume", "progress", "workdir", "stop_after_epoch", "devices", "data_dir"}
)


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite; the run stopped, its last good checkpoint kept."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """What every trainer's config has; a task's config subclasses it and adds its own fields.

  Attributes:
    optimizer: a name from ``examples.optimizers.NAMES``.
    epochs: total epochs of the run (it places the learning-rate decays).
    batch_size: global batch, split over the devices (must be a multiple of their number).
    workdir: folder for ``metrics.jsonl``, ``run.json`` and ``checkpoints/``.
    seed: the one seed of the run (initialization, data order, augmentation, dropout).
    resume: continue from the latest checkpoint in ``workdir`` (starts fresh if there is none).
    learning_rate: base learning rate replacing the paper's, or None.
    hparams: other optimizer hyperparameters replacing the paper's (``{"p": 0.25}``).
    devices: how many devices to use (the first ones of ``jax.devices()``); None for all.
    progress: show a progress bar.
    stop_after_epoch: stop cleanly after this epoch, as if killed there (for tests and preemptible
      jobs); the run can be resumed to ``epochs``.
  """

  optimizer: str = "padam"
  epochs: int = 1
  batch_size: int = 128
  workdir: str = "runs/default"
  seed: int = 0
  resume: bool = False
  learning_rate: float | None = None
  hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  devices: int | None = None
  progress: bool = True
  stop_after_epoch: int | None = None


class Evaluator:
  """Runs the jitted evaluation step over the batches a task gives it.

  Attributes:
    num_devices: devices the batch axis is split over; every batch's size must be a multiple.
  """

  def __init__(
    self,
    step: Callable[..., tuple[Carry, Sums]],
    state: Any,
    shard: Callable[[Any], Any],
    num_devices: int,
  ):
    self._step = step
    self._state = state
    self._shard = shard
    self.num_devices = num_devices

  def run(self, batches: Iterable[Batch], carry: Carry = None) -> dict[str, float]:
    """Sums the task's metric sums over ``batches`` (in eval mode), threading ``carry`` through.

    Args:
      batches: the batches of one evaluation stream, in order.
      carry: the initial carried state (e.g. a zero LSTM state), or None.

    Returns:
      The summed metrics, as Python floats.
    """
    totals = None
    carry = self._shard(carry)
    for batch in batches:
      carry, sums = self._step(self._state, carry, self._shard(batch))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
      raise ValueError("evaluation got no batches")
    return {k: float(v) for k, v in totals.items()}


class Task:
  """A training problem for :func:`train`. Subclass it and fill in the methods.

  Attributes (set by the subclass):
    registry_task: the optimizer registry's task (``"cifar10"``, ``"ptb2"``, ``"ptb3"``): it picks
      the paper's hyperparameters.
    unit: what the batches hold, for throughput: ``"images"`` logs ``images_per_second``.
    steps_per_epoch: number of batches :meth:`train_batches` yields per epoch.
    train_size: training examples per epoch (AdamW's normalized weight decay uses it).
  """

  registry_task: str
  unit: str = "examples"
  steps_per_epoch: int
  train_size: int

  def init_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model; it is in training mode (``train()``) for steps and ``eval()`` for evaluation."""
    raise NotImplementedError

  def transform(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """The registry's optimizer as the task uses it (e.g. ``chain(clip_by_global_norm(c), tx)``)."""
    return tx

  def init_carry(self, batch_size: int) -> Carry:
    """The carried state at the start of each epoch (e.g. zero LSTM states), or None."""
    del batch_size
    return None

  def train_batches(self, epoch: int, rng: jax.Array) -> Iterator[Batch]:
    """Yields the ``steps_per_epoch`` training batches of ``epoch`` (1-based), each of ``batch_size``.

    ``rng`` is derived from the seed and the epoch only, so the same epoch always gets the same
    batches (exact resumption depends on it).
    """
    raise NotImplementedError

  def loss(
    self, model: nnx.Module, batch: Batch, carry: Carry, rng: jax.Array, *, train: bool
  ) -> tuple[jax.Array, tuple[Carry, Sums]]:
    """The scalar loss to minimise, the next carry, and this batch's metric sums.

    Called inside ``jax.jit``. ``sums`` must include ``"count"`` (images or tokens in the batch: the
    throughput counts it) and is summed over the steps of an epoch or an evaluation stream.
    ``train`` is False for evaluation (the model is then in eval mode). The loop stops gradients
    through the returned carry.
    """
    raise NotImplementedError

  def checkpoint_state(self) -> dict[str, Any]:
    """Task state to save with each checkpoint (JSON-serialisable); none by default."""
    return {}

  def restore_checkpoint_state(self, state: Mapping[str, Any]) -> None:
    """Restores what :meth:`checkpoint_state` saved, when a run resumes."""
    del state

  def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
    """Turns an epoch's summed training metrics into the logged ones (``loss`` -> ``train_loss``).

    The default divides every sum by ``count``.
    """
    count = sums["count"]
    return {k: v / count for k, v in sums.items() if k != "count"}

  def evaluate(self, evaluator: Evaluator) -> dict[str, float]:
    """The end-of-epoch evaluation, logged as is (e.g. ``{"test_loss": ..., "test_acc": ...}``)."""
    raise NotImplementedError


def make_mesh(devices: int | None = None) -> jax.sharding.Mesh:
  """A one-axis ``data`` mesh over the first ``devices`` devices (all of them by default)."""
  available = jax.devices()
  count = len(available) if devices is None else devices
  if not 0 < count <= len(available):
    raise ValueError(f"asked for {devices} devices; {len(available)} are available")
  return jax.make_mesh(
    (count,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=available[:count]
  )


def _epoch_key(root: jax.Array, epoch: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(root, 1), epoch)


def _to_saveable(leaf: Any) -> Any:
  # Orbax stores plain arrays; typed PRNG keys (e.g. a model's dropout stream) go as their raw data.
  if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(leaf)
  return leaf


def _from_saved(saved: Any, like: Any) -> Any:
  if isinstance(like, jax.Array) and jnp.issubdtype(like.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(saved, impl=jax.random.key_impl(like))
  return saved


class _Checkpoints:
  """Orbax checkpoints of (model + optimizer state, run metadata), one per finished epoch."""

  def __init__(self, directory: pathlib.Path):
    options = ocp.CheckpointManagerOptions(
      max_to_keep=2, create=True, enable_async_checkpointing=False
    )
    self.manager = ocp.CheckpointManager(
      directory.absolute(), options=options, item_names=("state", "meta")
    )

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def save(self, epoch: int, state: Any, meta: Mapping[str, Any]) -> None:
    leaves = [_to_saveable(x) for x in jax.tree.leaves(state)]
    self.manager.save(
      epoch,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(leaves), meta=ocp.args.JsonSave(dict(meta))
      ),
    )
    self.manager.wait_until_finished()

  def restore(self, epoch: int, like: Any) -> tuple[Any, dict[str, Any]]:
    like_leaves, treedef = jax.tree.flatten(like)
    abstract = [
      jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding)
      for s in map(_to_saveable, like_leaves)
    ]
    restored = self.manager.restore(
      epoch,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
      ),
    )
    leaves = [
      _from_saved(saved, ref) for saved, ref in zip(restored["state"], like_leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, leaves), restored["meta"]

  def close(self) -> None:
    self.manager.close()


def _jsonable_config(config: LoopConfig) -> dict[str, Any]:
  return json.loads(json.dumps(dataclasses.asdict(config), default=repr))


def _check_same_run(
  saved: Mapping[str, Any], current: Mapping[str, Any], directory: pathlib.Path
) -> None:
  differ = sorted(
    k
    for k in set(saved) | set(current)
    if k not in RESUMABLE_FIELDS and saved.get(k) != current.get(k)
  )
  if differ:
    detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in differ)
    raise ValueError(
      f"cannot resume from {directory}: the run's settings differ ({detail}). Use the same settings or a new --workdir."
    )


def _progress_bar(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True, file=sys.stderr)


def train(task: Task, config: LoopConfig, *, log_every: int = 10) -> list[dict[str, Any]]:
  """Trains ``task`` as ``config`` says and returns the per-epoch records (also in metrics.jsonl).

  Args:
    task: the problem.
    config: the run's settings (a :class:`LoopConfig`, usually a task's subclass of it).
    log_every: steps between progress-bar updates and non-finite checks (each is a device sync).

  Returns:
    The run's history: one dict per epoch, from epoch 1 (restored epochs included on resume).

  Raises:
    NonFiniteLossError: when the training loss becomes NaN or infinite.
    ValueError: for bad settings, or a resume from a checkpoint made with other settings.
  """
  workdir = pathlib.Path(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = make_mesh(config.devices)
  num_devices = mesh.devices.size
  if config.batch_size % num_devices:
    raise ValueError(
      f"batch size {config.batch_size} is not a multiple of the {num_devices} devices"
    )
  if task.steps_per_epoch < 1:
    raise ValueError(
      f"an epoch has no steps: {task.train_size} examples, batch size {config.batch_size}"
    )
  replicated = NamedSharding(mesh, P())
  data_sharded = NamedSharding(mesh, P(DATA_AXIS))

  def shard(tree: Any) -> Any:
    if jax.process_count() == 1:
      return jax.device_put(tree, data_sharded)
    # Every process computes the same global batch; each device takes its slice of it.
    return jax.tree.map(lambda x: _global_array(np.asarray(x), data_sharded), tree)

  setup = optimizers.make_optimizer(
    config.optimizer,
    task=task.registry_task,
    steps_per_epoch=task.steps_per_epoch,
    epochs=config.epochs,
    batch_size=config.batch_size,
    train_size=task.train_size,
    learning_rate=config.learning_rate,
    **dict(config.hparams),
  )
  root = jax.random.key(config.seed)
  # One compiled program for all initializers: eagerly, XLA:CPU compiles a random-number kernel per
  # parameter shape, which costs seconds each on a small CPU.
  @nnx.jit
  def create(root):
    model = task.init_model(
      nnx.Rngs(params=jax.random.fold_in(root, 0), dropout=jax.random.fold_in(root, 2))
    )
    return model, nnx.Optimizer(model, task.transform(setup.tx), wrt=nnx.Param)

  model, optimizer = create(root)
  model.train()
  train_graph, state = nnx.split((model, optimizer))
  model.eval()
  eval_graph = nnx.graphdef((model, optimizer))
  state = jax.device_put(state, replicated)
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  del model, optimizer  # only the functional state is used from here on

  def train_step(state, carry, sums, batch, epoch_key, step):
    model, optimizer = nnx.merge(train_graph, state)
    rng = jax.random.fold_in(epoch_key, step)

    def loss_fn(model):
      return task.loss(model, batch, carry, rng, train=True)

    (_, (carry, batch_sums)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    sums = {k: sums[k] + batch_sums[k].astype(jnp.float32) for k in sums}
    return nnx.state((model, optimizer)), jax.lax.stop_gradient(carry), sums

  def eval_step(state, carry, batch):
    model, _ = nnx.merge(eval_graph, state)
    _, (carry, sums) = task.loss(model, batch, carry, jax.random.key(0), train=False)
    return carry, {k: v.astype(jnp.float32) for k, v in sums.items()}

  def zero_sums(state, carry, batch, key) -> Sums:
    def batch_sums(state, carry, batch):
      model, _ = nnx.merge(train_graph, state)
      return task.loss(model, batch, carry, key, train=True)[1][1]

    keys = jax.eval_shape(batch_sums, state, carry, batch)
    if "count" not in keys:
      raise ValueError("Task.loss must return sums with a 'count' entry")
    return {k: jax.device_put(jnp.zeros((), jnp.float32), replicated) for k in keys}

  train_jit = jax.jit(
    train_step, donate_argnums=(0, 1, 2), out_shardings=(replicated, data_sharded, replicated)
  )
  eval_jit = jax.jit(eval_step, out_shardings=(data_sharded, replicated))

  checkpoints = _Checkpoints(workdir / "checkpoints")
  config_json = _jsonable_config(config)
  history: list[dict[str, Any]] = []
  start_epoch = 1
  latest = checkpoints.latest()
  if latest is not None and not config.resume:
    checkpoints.close()
    raise ValueError(
      f"{workdir} already holds checkpoints (up to epoch {latest}); pass --resume to continue that run or choose a new --workdir"
    )
  if latest is not None:
    state, meta = checkpoints.restore(latest, state)
    _check_same_run(meta["config"], config_json, workdir)
    root = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
    history = list(meta["history"])
    task.restore_checkpoint_state(meta.get("task", {}))
    start_epoch = int(meta["epoch"]) + 1
    metrics.write_metrics(workdir, history)
    print(f"Resumed {workdir} after epoch {meta['epoch']} of {config.epochs}.", file=sys.stderr)
  else:
    metrics.write_metrics(workdir, [])
  run_info = {
    "config": config_json,
    "task": type(task).__name__,
    "optimizer": setup.hyperparams,
    "num_params": int(num_params),
    "devices": [str(d) for d in mesh.devices.flat],
    "jax": jax.__version__,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  (workdir / metrics.RUN_FILE).write_text(json.dumps(run_info, indent=2) + "\n")

  compiled = None
  last_epoch = (
    config.epochs
    if config.stop_after_epoch is None
    else min(config.epochs, config.stop_after_epoch)
  )
  try:
    for epoch in range(start_epoch, last_epoch + 1):
      epoch_key = _epoch_key(root, epoch)
      first_step = (epoch - 1) * task.steps_per_epoch
      carry = shard(task.init_carry(config.batch_size))
      sums = None
      bar = None
      batches = task.train_batches(epoch, epoch_key)
      start = None
      for index, batch in enumerate(batches):
        if index >= task.steps_per_epoch:
          raise ValueError(
            f"train_batches yielded more than steps_per_epoch={task.steps_per_epoch} batches"
          )
        batch = shard(batch)
        if sums is None:
          sums = zero_sums(state, carry, batch, epoch_key)
        if compiled is None:
          # Compile before the clock starts so epoch times and throughput measure training only.
          compiled = train_jit.lower(state, carry, sums, batch, epoch_key, jnp.int32(0)).compile()
        if start is None:
          start = time.perf_counter()
          bar = _progress_bar(
            task.steps_per_epoch, f"epoch {epoch}/{config.epochs}", config.progress
          )
        state, carry, sums = compiled(state, carry, sums, batch, epoch_key, jnp.int32(index))
        if (index + 1) % log_every == 0 or index + 1 == task.steps_per_epoch:
          host = {k: float(v) for k, v in sums.items()}
          live = task.summarize(host)
          if not all(math.isfinite(v) for v in live.values()):
            raise NonFiniteLossError(
              _non_finite_message(epoch, index + 1, live, checkpoints.latest(), workdir)
            )
          if bar is not None:
            rate = host["count"] / (time.perf_counter() - start)
            bar.set_postfix(
              {**{k: f"{v:.4g}" for k, v in live.items()}, f"{task.unit}/s": f"{rate:.1f}"},
              refresh=False,
            )
            bar.update((index + 1) - bar.n)
      else:
        if sums is None or index + 1 != task.steps_per_epoch:
          raise ValueError(
            f"train_batches yielded fewer than steps_per_epoch={task.steps_per_epoch} batches"
          )
      jax.block_until_ready(state)
      train_seconds = time.perf_counter() - start
      train_sums = {k: float(v) for k, v in sums.items()}
      if bar is not None:
        bar.close()
      eval_start = time.perf_counter()
      evaluation = task.evaluate(Evaluator(eval_jit, state, shard, num_devices))
      eval_seconds = time.perf_counter() - eval_start
      record = {
        "epoch": epoch,
        "step": epoch * task.steps_per_epoch,
        # The rate this epoch's updates used (decays fall on epoch boundaries for even splits).
        "lr": float(setup.learning_rate(first_step)),
        **{f"train_{k}": v for k, v in task.summarize(train_sums).items()},
        **evaluation,
        "epoch_seconds": train_seconds + eval_seconds,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        f"{task.unit}_per_second": train_sums["count"] / train_seconds,
      }
      history.append(record)
      meta = {
        "epoch": epoch,
        "history": history,
        "config": config_json,
        "rng": np.asarray(jax.random.key_data(root)).tolist(),
        "task": task.checkpoint_state(),
      }
      checkpoints.save(epoch, state, meta)
      metrics.append_metrics(workdir, record)
      shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("epoch", "step"))
      print(f"epoch {epoch}/{config.epochs}: {shown}", file=sys.stderr, flush=True)
  finally:
    checkpoints.close()
  return history


def _global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _non_finite_message(
  epoch: int, step: int, live: Mapping[str, float], last: int | None, workdir: pathlib.Path
) -> str:
  kept = (
    f"the last good checkpoint (epoch {last}) is kept in {workdir / 'checkpoints'}"
    if last
    else "no epoch had finished, so there is no checkpoint"
  )
  shown = ", ".join(f"{k}={v}" for k, v in live.items())
  return (
    f"non-finite training loss in epoch {epoch} by step {step} ({shown}); stopping. {kept.capitalize()}. "
    "A lower learning rate (--lr) or other hyperparameters may help."
  )
