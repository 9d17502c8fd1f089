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

:func:`train` reads as its steps: :func:`make_mesh` and :func:`check_settings`, the registry's
optimizer (:func:`make_optimizer`), the model and optimizer state (:func:`make_state`), the jitted
steps (:class:`Steps`), :func:`restore_or_start`, then per epoch :func:`train_epoch`,
:func:`evaluate` and :func:`record_epoch` (which calls :func:`save_checkpoint`).

Randomness is derived, never carried: epoch ``e`` uses ``fold_in(fold_in(root, 1), e)`` for its
batches and ``fold_in(that, step)`` inside each step, so a resumed run replays exactly what an
uninterrupted one would have done.
"""

from __future__ import annotations

import dataclasses
import functools
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

from examples import cli, metrics, optimizers

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

  Each field's ``metadata["help"]`` says what it means (it is also the help of its flag). Making a
  config checks the names it holds (the optimizer here, a task's model) against their choices.
  """

  optimizer: str = cli.setting(
    "padam",
    choices=optimizers.NAMES,
    metavar="OPT",
    help=f"optimizer from the registry: {', '.join(optimizers.NAMES)}",
  )
  epochs: int = cli.setting(
    1, help="total epochs; the learning rate is x0.1 after 50% and 75% of them"
  )
  batch_size: int = cli.setting(128, help="global batch, split over the devices")
  workdir: str = cli.setting(
    "runs/default", required=True, help="folder for metrics.jsonl, run.json and checkpoints/"
  )
  seed: int = cli.setting(0, help="seed for initialization, data order and augmentation")
  resume: bool = cli.setting(
    False,
    help="continue from the latest checkpoint in --workdir (starts fresh if there is none)",
  )
  learning_rate: float | None = cli.setting(
    None, flag="lr", help="base learning rate replacing the paper's value for this optimizer"
  )
  hparams: Mapping[str, Any] = cli.setting(
    default_factory=dict,
    flag="hparam",
    metavar="KEY=VALUE",
    help="another optimizer hyperparameter replacing the paper's, e.g. p=0.25 or "
    "weight_decay=1e-4 (repeatable)",
  )
  devices: int | None = cli.setting(
    None, help="number of devices to split the batch over (default: all)"
  )
  progress: bool = cli.setting(True, help="no progress bar (one line per epoch is still printed)")
  # Stop cleanly after this epoch, as if killed there (for tests and preemptible jobs); the run can
  # be resumed to ``epochs``.
  stop_after_epoch: int | None = cli.setting(
    None, cli=False, help="stop cleanly after this epoch, as if killed there"
  )

  def __post_init__(self):
    cli.check_choices(self)


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


class Checkpoints:
  """Orbax checkpoints of (model + optimizer state, run metadata), one per finished epoch.

  The state is saved as the flat list of its leaves (typed PRNG keys as their raw data), the
  metadata as JSON (see :func:`save_checkpoint`). Use it as a context manager, or call
  :meth:`close`.

  Attributes:
    directory: the folder of the checkpoints (``WORKDIR/checkpoints``).
  """

  def __init__(self, directory: pathlib.Path):
    self.directory = directory
    options = ocp.CheckpointManagerOptions(
      max_to_keep=2, create=True, enable_async_checkpointing=False
    )
    self.manager = ocp.CheckpointManager(
      directory.absolute(), options=options, item_names=("state", "meta")
    )

  def latest(self) -> int | None:
    """The last saved epoch, or None."""
    return self.manager.latest_step()

  def save(self, epoch: int, state: Any, meta: Mapping[str, Any]) -> None:
    """Saves ``state`` and ``meta`` as the checkpoint of ``epoch`` and waits until it is written."""
    leaves = [_to_saveable(x) for x in jax.tree.leaves(state)]
    self.manager.save(
      epoch,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(leaves), meta=ocp.args.JsonSave(dict(meta))
      ),
    )
    self.manager.wait_until_finished()

  def restore(self, epoch: int, like: Any) -> tuple[Any, dict[str, Any]]:
    """The state (with the tree structure, shardings and key types of ``like``) and the metadata."""
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

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


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


# ---- the steps of a run, in the order train() takes them ----


def check_settings(task: Task, config: LoopConfig, mesh: jax.sharding.Mesh) -> None:
  """Raises ValueError when the batch does not split over the devices or an epoch has no steps."""
  num_devices = mesh.devices.size
  if config.batch_size % num_devices:
    raise ValueError(
      f"batch size {config.batch_size} is not a multiple of the {num_devices} devices"
    )
  if task.steps_per_epoch < 1:
    raise ValueError(
      f"an epoch has no steps: {task.train_size} examples, batch size {config.batch_size}"
    )


def make_optimizer(task: Task, config: LoopConfig) -> optimizers.OptimizerSetup:
  """The registry's optimizer for ``task`` with the overrides of ``config``."""
  return optimizers.make_optimizer(
    config.optimizer,
    task=task.registry_task,
    steps_per_epoch=task.steps_per_epoch,
    epochs=config.epochs,
    batch_size=config.batch_size,
    train_size=task.train_size,
    learning_rate=config.learning_rate,
    **dict(config.hparams),
  )


@dataclasses.dataclass(frozen=True)
class Model:
  """The model and optimizer of a run without their state, for the functional steps.

  Attributes:
    train_graph: the graph of (model, optimizer) in training mode.
    eval_graph: the same in eval mode.
    num_params: number of parameters.
  """

  train_graph: nnx.GraphDef
  eval_graph: nnx.GraphDef
  num_params: int


def make_state(
  task: Task, tx: optax.GradientTransformation, root: jax.Array, mesh: jax.sharding.Mesh
) -> tuple[Model, nnx.State]:
  """Initializes the task's model and an ``nnx.Optimizer`` with ``task.transform(tx)`` from ``root``.

  The parameters are drawn from ``fold_in(root, 0)`` and the dropout stream from
  ``fold_in(root, 2)``.

  Returns:
    The model's graphs and the state of (model, optimizer) (parameters, batch statistics, RNG
    streams, optimizer state), replicated over ``mesh``.
  """

  # One compiled program for all initializers: eagerly, XLA:CPU compiles a random-number kernel per
  # parameter shape, which costs seconds each on a small CPU.
  @nnx.jit
  def create(root):
    model = task.init_model(
      nnx.Rngs(params=jax.random.fold_in(root, 0), dropout=jax.random.fold_in(root, 2))
    )
    return model, nnx.Optimizer(model, task.transform(tx), wrt=nnx.Param)

  model, optimizer = create(root)
  model.train()
  train_graph, state = nnx.split((model, optimizer))
  model.eval()
  eval_graph = nnx.graphdef((model, optimizer))
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  state = jax.device_put(state, NamedSharding(mesh, P()))
  return Model(train_graph, eval_graph, int(num_params)), state


def _train_step(task: Task, graph: nnx.GraphDef, state, carry, sums, batch, epoch_key, step):
  model, optimizer = nnx.merge(graph, state)
  rng = jax.random.fold_in(epoch_key, step)

  def loss_fn(model):
    return task.loss(model, batch, carry, rng, train=True)

  (_, (carry, batch_sums)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  sums = {k: sums[k] + batch_sums[k].astype(jnp.float32) for k in sums}
  return nnx.state((model, optimizer)), jax.lax.stop_gradient(carry), sums


def _eval_step(task: Task, graph: nnx.GraphDef, state, carry, batch):
  model, _ = nnx.merge(graph, state)
  _, (carry, sums) = task.loss(model, batch, carry, jax.random.key(0), train=False)
  return carry, {k: v.astype(jnp.float32) for k, v in sums.items()}


class Steps:
  """The jitted train and eval steps of a run, and the placement of batches on the mesh.

  The train step is compiled once, on the first batch (:meth:`compile`), before any clock starts.

  Attributes:
    mesh: the one-axis ``data`` mesh.
    num_devices: devices the batch axis is split over.
    replicated: the sharding of the model and optimizer state (and the metric sums).
    data_sharded: the sharding of batches and carries (leading axis over ``data``).
    eval: the jitted eval step, ``(state, carry, batch) -> (carry, sums)``.
  """

  def __init__(self, task: Task, model: Model, mesh: jax.sharding.Mesh):
    self.mesh = mesh
    self.num_devices = mesh.devices.size
    self.replicated = NamedSharding(mesh, P())
    self.data_sharded = NamedSharding(mesh, P(DATA_AXIS))
    self._task = task
    self._train_graph = model.train_graph
    self._train = jax.jit(
      functools.partial(_train_step, task, model.train_graph),
      donate_argnums=(0, 1, 2),
      out_shardings=(self.replicated, self.data_sharded, self.replicated),
    )
    self._compiled = None
    self.eval = jax.jit(
      functools.partial(_eval_step, task, model.eval_graph),
      out_shardings=(self.data_sharded, self.replicated),
    )

  def shard(self, tree: Any) -> Any:
    """Places a batch (or carry) with its leading axis split over the devices."""
    if jax.process_count() == 1:
      return jax.device_put(tree, self.data_sharded)
    # Every process computes the same global batch; each device takes its slice of it.
    return jax.tree.map(lambda x: _global_array(np.asarray(x), self.data_sharded), tree)

  def zero_sums(self, state: Any, carry: Carry, batch: Batch, key: jax.Array) -> Sums:
    """Zeros for each metric sum the task's loss returns (found by tracing it, not running it)."""

    def batch_sums(state, carry, batch):
      model, _ = nnx.merge(self._train_graph, state)
      return self._task.loss(model, batch, carry, key, train=True)[1][1]

    keys = jax.eval_shape(batch_sums, state, carry, batch)
    if "count" not in keys:
      raise ValueError("Task.loss must return sums with a 'count' entry")
    return {k: jax.device_put(jnp.zeros((), jnp.float32), self.replicated) for k in keys}

  def compile(self, state: Any, carry: Carry, sums: Sums, batch: Batch, key: jax.Array) -> None:
    """Compiles the train step for these shapes, once per run."""
    if self._compiled is None:
      self._compiled = self._train.lower(state, carry, sums, batch, key, jnp.int32(0)).compile()

  def train(
    self, state: Any, carry: Carry, sums: Sums, batch: Batch, key: jax.Array, index: int
  ) -> tuple[Any, Carry, Sums]:
    """One optimizer step; ``state``, ``carry`` and ``sums`` are donated."""
    return self._compiled(state, carry, sums, batch, key, jnp.int32(index))


@dataclasses.dataclass
class RunState:
  """Where a run stands after its last finished epoch.

  Attributes:
    state: the model and optimizer state.
    root: the run's root PRNG key (every epoch's key is derived from it).
    history: one record per finished epoch.
    epoch: the last finished epoch (0 before the first).
  """

  state: Any
  root: jax.Array
  history: list[dict[str, Any]]
  epoch: int = 0


def restore_or_start(
  checkpoints: Checkpoints, state: Any, root: jax.Array, task: Task, config: LoopConfig
) -> RunState:
  """The run from its latest checkpoint (with ``config.resume``), or a fresh one at epoch 0.

  Either way ``WORKDIR/metrics.jsonl`` is rewritten to the history so far.

  Raises:
    ValueError: when there are checkpoints but no ``config.resume``, or the checkpoint's settings
      differ from ``config``'s.
  """
  workdir = pathlib.Path(config.workdir)
  latest = checkpoints.latest()
  if latest is None:
    metrics.write_metrics(workdir, [])
    return RunState(state, root, [])
  if not config.resume:
    raise ValueError(
      f"{workdir} already holds checkpoints (up to epoch {latest}); pass --resume to continue that run or choose a new --workdir"
    )
  state, meta = checkpoints.restore(latest, state)
  _check_same_run(meta["config"], _jsonable_config(config), workdir)
  task.restore_checkpoint_state(meta.get("task", {}))
  run = RunState(
    state=state,
    root=jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32)),
    history=list(meta["history"]),
    epoch=int(meta["epoch"]),
  )
  metrics.write_metrics(workdir, run.history)
  print(f"Resumed {workdir} after epoch {meta['epoch']} of {config.epochs}.", file=sys.stderr)
  return run


def write_run_info(
  task: Task, config: LoopConfig, setup: optimizers.OptimizerSetup, model: Model, steps: Steps
) -> None:
  """Writes ``WORKDIR/run.json``: the config, optimizer hyperparameters, devices and versions."""
  run_info = {
    "config": _jsonable_config(config),
    "task": type(task).__name__,
    "optimizer": setup.hyperparams,
    "num_params": model.num_params,
    "devices": [str(d) for d in steps.mesh.devices.flat],
    "jax": jax.__version__,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  path = pathlib.Path(config.workdir) / metrics.RUN_FILE
  path.write_text(json.dumps(run_info, indent=2) + "\n")


def last_epoch(config: LoopConfig) -> int:
  """The epoch this invocation stops after: ``epochs``, or ``stop_after_epoch`` if earlier."""
  if config.stop_after_epoch is None:
    return config.epochs
  return min(config.epochs, config.stop_after_epoch)


def epoch_key(root: jax.Array, epoch: int) -> jax.Array:
  """The key of ``epoch`` (batches; ``fold_in(key, step)`` inside each step)."""
  return jax.random.fold_in(jax.random.fold_in(root, 1), epoch)


@dataclasses.dataclass(frozen=True)
class EpochTraining:
  """What :func:`train_epoch` measured.

  Attributes:
    sums: the epoch's metric sums (``task.loss``'s ``sums`` over its steps), as Python floats.
    seconds: time of the steps, compilation excluded.
  """

  sums: dict[str, float]
  seconds: float


class _ProgressBar:
  """A tqdm bar over an epoch's steps with the live metrics and throughput; nothing when disabled."""

  def __init__(self, total: int, desc: str, unit: str, start: float, enabled: bool):
    self._unit = unit
    self._start = start
    self._bar = None
    if enabled:
      from tqdm.auto import tqdm

      self._bar = tqdm(
        total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True, file=sys.stderr
      )

  def show(self, step: int, live: Mapping[str, float], count: float) -> None:
    if self._bar is None:
      return
    rate = count / (time.perf_counter() - self._start)
    self._bar.set_postfix(
      {**{k: f"{v:.4g}" for k, v in live.items()}, f"{self._unit}/s": f"{rate:.1f}"},
      refresh=False,
    )
    self._bar.update(step - self._bar.n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def check_finite(
  live: Mapping[str, float], epoch: int, step: int, checkpoints: Checkpoints
) -> None:
  """Raises :class:`NonFiniteLossError` when a live training metric is NaN or infinite."""
  if not all(math.isfinite(v) for v in live.values()):
    raise NonFiniteLossError(_non_finite_message(epoch, step, live, checkpoints))


def train_epoch(
  steps: Steps,
  state: Any,
  task: Task,
  config: LoopConfig,
  epoch: int,
  checkpoints: Checkpoints,
  *,
  key: jax.Array,
  log_every: int = 10,
) -> tuple[Any, EpochTraining]:
  """Runs the ``steps_per_epoch`` train steps of ``epoch``; returns the new state and the sums.

  Every ``log_every`` steps (and at the last) the sums are fetched: the progress bar shows them and
  :func:`check_finite` stops the run on a non-finite loss.
  """
  carry = steps.shard(task.init_carry(config.batch_size))
  sums = bar = start = None
  index = -1
  for index, batch in enumerate(task.train_batches(epoch, key)):
    if index >= task.steps_per_epoch:
      raise ValueError(
        f"train_batches yielded more than steps_per_epoch={task.steps_per_epoch} batches"
      )
    batch = steps.shard(batch)
    if start is None:
      sums = steps.zero_sums(state, carry, batch, key)
      # Compile before the clock starts so epoch times and throughput measure training only.
      steps.compile(state, carry, sums, batch, key)
      start = time.perf_counter()
      desc = f"epoch {epoch}/{config.epochs}"
      bar = _ProgressBar(task.steps_per_epoch, desc, task.unit, start, config.progress)
    state, carry, sums = steps.train(state, carry, sums, batch, key, index)
    if (index + 1) % log_every == 0 or index + 1 == task.steps_per_epoch:
      host = {k: float(v) for k, v in sums.items()}
      live = task.summarize(host)
      check_finite(live, epoch, index + 1, checkpoints)
      bar.show(index + 1, live, host["count"])
  if index + 1 != task.steps_per_epoch:
    raise ValueError(
      f"train_batches yielded fewer than steps_per_epoch={task.steps_per_epoch} batches"
    )
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  host = {k: float(v) for k, v in sums.items()}
  bar.close()
  return state, EpochTraining(host, seconds)


def evaluate(steps: Steps, state: Any, task: Task) -> tuple[dict[str, float], float]:
  """The task's end-of-epoch evaluation of ``state`` and its seconds."""
  start = time.perf_counter()
  evaluation = task.evaluate(Evaluator(steps.eval, state, steps.shard, steps.num_devices))
  return evaluation, time.perf_counter() - start


def epoch_record(
  epoch: int,
  task: Task,
  setup: optimizers.OptimizerSetup,
  trained: EpochTraining,
  evaluation: Mapping[str, float],
  eval_seconds: float,
) -> dict[str, Any]:
  """One line of ``metrics.jsonl``: epoch, step, lr, train and evaluation metrics, timings."""
  first_step = (epoch - 1) * task.steps_per_epoch
  return {
    "epoch": epoch,
    "step": epoch * task.steps_per_epoch,
    # The rate this epoch's updates used (decays fall on epoch boundaries for even splits).
    "lr": float(setup.learning_rate(first_step)),
    **{f"train_{k}": v for k, v in task.summarize(trained.sums).items()},
    **evaluation,
    "epoch_seconds": trained.seconds + eval_seconds,
    "train_seconds": trained.seconds,
    "eval_seconds": eval_seconds,
    f"{task.unit}_per_second": trained.sums["count"] / trained.seconds,
  }


def save_checkpoint(
  checkpoints: Checkpoints, run: RunState, task: Task, config: LoopConfig
) -> None:
  """Saves the checkpoint of ``run.epoch``: the state, and as metadata the epoch, the history, the
  config, the root key and the task's :meth:`Task.checkpoint_state`."""
  meta = {
    "epoch": run.epoch,
    "history": run.history,
    "config": _jsonable_config(config),
    "rng": np.asarray(jax.random.key_data(run.root)).tolist(),
    "task": task.checkpoint_state(),
  }
  checkpoints.save(run.epoch, run.state, meta)


def record_epoch(
  run: RunState,
  state: Any,
  record: dict[str, Any],
  checkpoints: Checkpoints,
  task: Task,
  config: LoopConfig,
) -> None:
  """Adds a finished epoch to ``run``: its history, a checkpoint, metrics.jsonl and one printed line."""
  run.state = state
  run.epoch = record["epoch"]
  run.history.append(record)
  save_checkpoint(checkpoints, run, task, config)
  metrics.append_metrics(config.workdir, record)
  shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("epoch", "step"))
  print(f"epoch {run.epoch}/{config.epochs}: {shown}", file=sys.stderr, flush=True)


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
  check_settings(task, config, mesh)
  setup = make_optimizer(task, config)
  root = jax.random.key(config.seed)
  model, state = make_state(task, setup.tx, root, mesh)
  steps = Steps(task, model, mesh)
  with Checkpoints(workdir / "checkpoints") as checkpoints:
    run = restore_or_start(checkpoints, state, root, task, config)
    del state  # a restored run replaces it; from here on the run holds the state
    write_run_info(task, config, setup, model, steps)
    for epoch in range(run.epoch + 1, last_epoch(config) + 1):
      key = epoch_key(run.root, epoch)
      state, trained = train_epoch(
        steps, run.state, task, config, epoch, checkpoints, key=key, log_every=log_every
      )
      evaluation, eval_seconds = evaluate(steps, state, task)
      record = epoch_record(epoch, task, setup, trained, evaluation, eval_seconds)
      record_epoch(run, state, record, checkpoints, task, config)
  return run.history


def _global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _non_finite_message(
  epoch: int, step: int, live: Mapping[str, float], checkpoints: Checkpoints
) -> str:
  last = checkpoints.latest()
  kept = (
    f"the last good checkpoint (epoch {last}) is kept in {checkpoints.directory}"
    if last
    else "no epoch had finished, so there is no checkpoint"
  )
  shown = ", ".join(f"{k}={v}" for k, v in live.items())
  return (
    f"non-finite training loss in epoch {epoch} by step {step} ({shown}); stopping. {kept.capitalize()}. "
    "A lower learning rate (--lr) or other hyperparameters may help."
  )
