"""The training loop shared by the example trainers (CIFAR-10 images, Penn Treebank language models).

A trainer describes its problem as a :class:`Task` (model, batches, loss, evaluation) and a config
derived from :class:`LoopConfig`; :func:`train` does the rest, the same way for every task:

- the optimizer from the one registry, ``examples.optimizers.make_optimizer``, its learning rate
  logged per epoch;
- one jitted, functional train step (``nnx.split``/``nnx.merge``) built from the task's loss, on
  a ``data`` x ``fsdp`` ``jax.make_mesh`` mesh: the batch split over every device, the model and
  optimizer state replicated or, with ``--mesh ...,fsdp=K``, its large arrays split over ``fsdp``
  (:func:`fsdp_spec`), so the same code runs on one CPU, many accelerators or many processes
  (``jax.distributed``; the primary process writes the files and prints);
- a per-epoch carried state (an LSTM's hidden state; ``None`` for feed-forward tasks) that is reset at
  the start of each epoch and threaded through the steps without gradient;
- an epoch-end evaluation that the task drives (a test set, or whole valid/test token streams);
- ``WORKDIR/metrics.jsonl`` (one JSON object per epoch, see :mod:`examples.metrics`), a progress bar,
  an Orbax checkpoint after every epoch (saved only when the whole state is finite, read back and
  verified against its SHA-256) and exact resumption from the newest one that verifies, a stop on
  a non-finite loss or state that keeps the last finite checkpoint, and the same numbers for the
  same seed.

:func:`train` reads as its steps: :func:`check_run` (every option, the workdir and what it holds,
before a trainer loads its data), :func:`make_mesh` and :func:`check_settings`,
:func:`check_same_data`, the registry's optimizer (:func:`make_optimizer`),
:func:`remove_previous_run` (``--overwrite``), the model and optimizer state (:func:`make_state`),
the jitted steps (:class:`Steps`), :func:`restore_or_start`, then per epoch :func:`train_epoch`,
:func:`evaluate` and :func:`record_epoch` (which calls :func:`check_finite_state` and
:func:`save_checkpoint`).

Randomness is derived, never carried: epoch ``e`` uses ``fold_in(fold_in(root, 1), e)`` for its
batches and ``fold_in(that, step)`` inside each step, so a resumed run replays exactly what an
uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import numbers
import os
import pathlib
import shutil
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
FSDP_AXIS = "fsdp"
# The axes of every run's mesh, in this order; a batch is split over all of them (over every device).
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
# Under ``--mesh ...,fsdp=K`` (K > 1), arrays of the state with at least this many elements are
# split over the fsdp axis; smaller ones (biases, BatchNorm statistics, counters, keys) are replicated.
FSDP_MIN_SIZE = 4096
# Config fields that may change between a run and its resumption without changing its results
# (the mesh changes only where the arrays live: a checkpoint restores onto any layout).
RESUMABLE_FIELDS = frozenset(
  {
    "resume",
    "overwrite",
    "progress",
    "workdir",
    "stop_after_epoch",
    "devices",
    "mesh",
    "data_dir",
    "eval_every",
    "checkpoint_every",
    "test_every",
  }
)
# Config fields that may change when a run resumes, each change recorded in run.json
# ("resumptions"); the learning rate's new base value applies with the same decay steps.
CHANGEABLE_ON_RESUME = frozenset({"learning_rate"})
# Config fields newer than some checkpoints, with the value the runs that wrote those had: a
# checkpoint without the field resumes as if it held that value.
ADDED_FIELDS = {"dtype": "float32"}
# The compute dtypes of ``--dtype``: activations and the operands of convolutions and matmuls.
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
FLOAT16_WARNING = (
  "warning: --dtype float16 has no loss scaling: gradients below float16's range (6e-8) become 0 "
  "and activations or gradients above 65504 become infinite (the run then stops); bfloat16 has "
  "float32's range"
)
CHECKPOINTS_DIR = "checkpoints"
# What a previous run leaves in its workdir; a new run refuses to start over them.
PREVIOUS_RUN_FILES = (metrics.METRICS_FILE, metrics.RUN_FILE, CHECKPOINTS_DIR, metrics.STOPPED_FILE)


class NonFiniteLossError(RuntimeError):
  """The training loss or the state became NaN or infinite; the run stopped, its last finite
  checkpoint kept."""


class CheckpointError(ValueError):
  """A checkpoint cannot be used: its metadata is missing or garbled, or its arrays do not restore
  or do not match their digest."""


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
    help="continue the run in --workdir from its newest checkpoint that verifies (starts fresh "
    "if the folder holds no finished epoch); --lr may change, the rest must not",
  )
  overwrite: bool = cli.setting(
    False,
    help="replace the previous run in --workdir (metrics.jsonl, run.json, checkpoints/) instead "
    "of refusing to start there",
  )
  learning_rate: float | None = cli.setting(
    None,
    flag="lr",
    help="base learning rate replacing the paper's value for this optimizer (on --resume: the new "
    "base rate from the next epoch on, with the same decay steps; default: the run's)",
  )
  hparams: Mapping[str, Any] = cli.setting(
    default_factory=dict,
    flag="hparam",
    metavar="KEY=VALUE",
    help="another optimizer hyperparameter replacing the paper's, e.g. p=0.25 or "
    "weight_decay=1e-4 (repeatable)",
  )
  dtype: str = cli.setting(
    "float32",
    choices=COMPUTE_DTYPES,
    help="compute dtype of the activations, convolutions and matmuls; the parameters, optimizer "
    "state, BatchNorm statistics and loss stay float32 (float16 has no loss scaling)",
  )
  devices: int | None = cli.setting(
    None, help="number of devices to split the batch over (default: all)"
  )
  mesh: str | None = cli.setting(
    None,
    metavar="AXIS=N,...",
    help=f"device mesh, e.g. data=2,fsdp=4: every batch is split over all its devices; the "
    f"parameters and optimizer state of at least {FSDP_MIN_SIZE} elements are split over fsdp "
    "(FSDP), the rest replicated. The sizes multiply to the devices used (default: data=DEVICES, "
    "the state replicated)",
  )
  progress: bool = cli.setting(True, help="no progress bar (one line per epoch is still printed)")
  eval_every: int = cli.setting(
    1,
    help="evaluate every N epochs and after the last (the other epochs log training metrics only)",
  )
  checkpoint_every: int = cli.setting(
    1,
    help="checkpoint every N epochs and after the last one this invocation runs (a killed run "
    "resumes from the newest checkpoint, redoing at most N-1 epochs)",
  )
  # Stop cleanly after this epoch, as if killed there (for tests and preemptible jobs); the run can
  # be resumed to ``epochs``.
  stop_after_epoch: int | None = cli.setting(
    None, cli=False, help="stop cleanly after this epoch, as if killed there"
  )

  def __post_init__(self):
    cli.check_choices(self)
    self.check_values()

  def check_values(self) -> None:
    """Raises ValueError naming the option, its value and what is valid, for a value out of range.

    A task's config extends it (calling this one) for its own fields.
    """
    cli.check_int("--epochs", self.epochs, minimum=1)
    cli.check_int("--batch-size", self.batch_size, minimum=1)
    cli.check_int("--seed", self.seed)
    cli.check_int("--devices", self.devices, minimum=1, optional=True)
    cli.check_int("--eval-every", self.eval_every, minimum=1)
    cli.check_int("--checkpoint-every", self.checkpoint_every, minimum=1)
    if self.mesh is not None:
      parse_mesh(self.mesh)
    cli.check_int("stop_after_epoch", self.stop_after_epoch, minimum=1, optional=True)
    if self.learning_rate is not None:
      cli.check_number("--lr", self.learning_rate, positive=True)
    if not isinstance(self.workdir, str | os.PathLike) or not str(self.workdir):
      raise ValueError(f"--workdir {self.workdir!r} is not valid; expected a folder name")
    if "learning_rate" in self.hparams:
      value = self.hparams["learning_rate"]
      raise ValueError(
        f"--hparam learning_rate={json.dumps(value, default=repr)} is not valid; set the base "
        "learning rate with --lr"
      )
    if self.resume and self.overwrite:
      raise ValueError(
        "--resume and --overwrite exclude each other: --resume continues the run in --workdir, "
        "--overwrite replaces it"
      )


class Evaluator:
  """Runs the jitted evaluation step over the batches a task gives it.

  Attributes:
    num_devices: devices the batch axis is split over; every batch's size must be a multiple.
    epoch: the epoch just trained (0 when not known).
    final: whether it is the run's last epoch (``epochs``).
  """

  def __init__(
    self,
    step: Callable[..., tuple[Carry, Sums]],
    state: Any,
    shard: Callable[[Any], Any],
    num_devices: int,
    *,
    epoch: int = 0,
    final: bool = False,
  ):
    self._step = step
    self._state = state
    self._shard = shard
    self.num_devices = num_devices
    self.epoch = epoch
    self.final = final

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

  def describe_data(self) -> dict[str, Any] | None:
    """What identifies the data: ``{"files": [...], "sha256": fingerprint(arrays used)}``, or None.

    Recorded in run.json and each checkpoint; ``--resume`` refuses other data (same SHA-256).
    """
    return None

  def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
    """Turns an epoch's summed training metrics into the logged ones (``loss`` -> ``train_loss``).

    The default divides every sum by ``count``.
    """
    count = sums["count"]
    return {k: v / count for k, v in sums.items() if k != "count"}

  def evaluate(self, evaluator: Evaluator) -> dict[str, float]:
    """The end-of-epoch evaluation, logged as is (e.g. ``{"test_loss": ..., "test_acc": ...}``)."""
    raise NotImplementedError


def parse_mesh(text: str) -> dict[str, int]:
  """The axis sizes of ``--mesh``: ``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}``.

  An axis left out has size 1.

  Raises:
    ValueError: one line naming ``--mesh``, the value and what is valid, for bad syntax, an unknown
      or repeated axis, or a size that is not a positive integer.
  """
  valid = (
    "expected AXIS=SIZE pairs joined by commas over the axes data and fsdp, e.g. data=2,fsdp=4"
  )
  if not isinstance(text, str):
    raise ValueError(f"--mesh {text!r} is not valid; {valid}")
  sizes: dict[str, int] = {}
  for part in text.split(","):
    name, sep, value = (x.strip() for x in part.partition("="))
    if not sep or not name:
      raise ValueError(f"--mesh {text!r} is not valid; {valid}")
    if name not in MESH_AXES:
      raise ValueError(f"--mesh {text!r} is not valid; unknown axis {name!r} ({valid})")
    if name in sizes:
      raise ValueError(f"--mesh {text!r} is not valid; axis {name!r} is given twice")
    if not value.isdigit() or int(value) < 1:
      raise ValueError(
        f"--mesh {text!r} is not valid; the size of {name!r} must be a positive integer"
      )
    sizes[name] = int(value)
  return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def mesh_sizes(mesh: str | None, count: int) -> dict[str, int]:
  """The size of each axis of :data:`MESH_AXES` for a run on ``count`` devices.

  Args:
    mesh: the ``--mesh`` text, or None for every device on ``data`` (the state replicated).
    count: the number of devices the run uses.

  Raises:
    ValueError: when ``mesh`` is not valid (:func:`parse_mesh`) or its sizes do not multiply to
      ``count``.
  """
  if mesh is None:
    return {DATA_AXIS: count, FSDP_AXIS: 1}
  sizes = parse_mesh(mesh)
  product = math.prod(sizes.values())
  if product != count:
    raise ValueError(
      f"--mesh {mesh} is not valid; its sizes multiply to {product}, but the run uses {count} "
      "devices (all there are, or --devices)"
    )
  return sizes


def make_mesh(devices: int | None = None, mesh: str | None = None) -> jax.sharding.Mesh:
  """The run's ``data`` x ``fsdp`` mesh over the first ``devices`` devices (all by default).

  Args:
    devices: how many devices, or None for all of them (of every process).
    mesh: the ``--mesh`` text (:func:`mesh_sizes`), or None for every device on ``data``.
  """
  available = jax.devices()
  count = len(available) if devices is None else devices
  if not 0 < count <= len(available):
    raise ValueError(f"asked for {devices} devices; {len(available)} are available")
  sizes = mesh_sizes(mesh, count)
  return jax.make_mesh(
    tuple(sizes[axis] for axis in MESH_AXES),
    MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    devices=available[:count],
  )


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """Where an array of ``shape`` lives on a mesh whose ``fsdp`` axis has ``fsdp`` devices.

  It is split over ``fsdp`` along its largest dimension that ``fsdp`` divides (the first of equal
  ones); it is replicated when ``fsdp`` is 1, when it has fewer than ``min_size`` elements, or when
  no dimension divides. An optimizer's per-parameter state (Padam's ``mu``, ``nu``, ``nu_max``) has
  its parameter's shape, so it is split as its parameter is.

  Examples:
    >>> fsdp_spec((3, 3, 64, 128), 4)
    P(None, None, None, 'fsdp')
    >>> fsdp_spec((128,), 4), fsdp_spec((30, 501), 4)
    (P(), P())
  """
  if fsdp == 1 or math.prod(shape) < min_size:
    return P()
  divisible = [d for d, n in enumerate(shape) if n % fsdp == 0]
  if not divisible:
    return P()
  split = max(divisible, key=lambda d: shape[d])
  return P(*(FSDP_AXIS if d == split else None for d in range(len(shape))))


def state_shardings(state: Any, mesh: jax.sharding.Mesh) -> Any:
  """A NamedSharding per array of ``state`` (arrays or ``jax.ShapeDtypeStruct``), by :func:`fsdp_spec`."""
  fsdp = mesh.shape[FSDP_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp)), state)


def is_primary() -> bool:
  """Whether this is the process that writes metrics.jsonl and run.json and prints (process 0)."""
  return jax.process_index() == 0


def say(message: str) -> None:
  """Prints ``message`` on stderr, from the primary process only (:func:`is_primary`)."""
  if is_primary():
    print(message, file=sys.stderr, flush=True)


def sync_processes(name: str) -> None:
  """Waits until every process of a multi-process run got here (nothing in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def host_value(x: Any) -> np.ndarray:
  """The whole of array ``x`` on the host of every process.

  An array split over the devices of several processes is gathered (collectively: every process
  must call this for the same arrays in the same order); a replicated one is read locally.
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _to_saveable(leaf: Any) -> Any:
  # Orbax stores plain arrays; typed PRNG keys (e.g. a model's dropout stream) go as their raw data.
  if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(leaf)
  return leaf


def _from_saved(saved: Any, like: Any) -> Any:
  if isinstance(like, jax.Array) and jnp.issubdtype(like.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(saved, impl=jax.random.key_impl(like))
  return saved


def host_leaves(state: Any) -> Iterator[np.ndarray]:
  """The leaves of ``state`` as whole host arrays, one at a time, in the form a checkpoint stores
  them (typed PRNG keys as their raw data).

  A leaf split over the devices of several processes is gathered (:func:`host_value`): every
  process gets the same arrays, so every process computes the same digest from them.
  """
  for leaf in jax.tree.leaves(state):
    yield host_value(_to_saveable(leaf))


def state_digest(leaves: Iterable[np.ndarray]) -> str:
  """SHA-256 over the dtype, shape and bytes of each array, in order."""
  digest = hashlib.sha256()
  for x in leaves:
    x = np.ascontiguousarray(x)
    digest.update(f"{x.dtype.str}{x.shape};".encode())
    digest.update(x.tobytes())
  return digest.hexdigest()


def fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
  """SHA-256 over the names, dtypes, shapes and bytes of ``arrays`` (a task's data)."""
  digest = hashlib.sha256()
  for name, x in arrays.items():
    digest.update(name.encode() + b"\0")
    digest.update(state_digest([np.asarray(x)]).encode())
  return digest.hexdigest()


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  line = text[0] if text else type(error).__name__
  return line if len(line) <= 200 else line[:197] + "..."


META_KEYS = ("epoch", "history", "config", "rng")


@contextlib.contextmanager
def _quiet_closed_event_loop(settle_seconds: float = 0.5) -> Iterator[None]:
  """Drops the "Event loop is closed" errors that TensorStore's pending reads report (as
  unraisable exceptions, tracebacks on stderr) after Orbax gave up on a corrupt checkpoint."""
  previous = sys.unraisablehook
  failed = []

  def hook(unraisable: Any) -> None:
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
      unraisable.exc_value
    ):
      return
    previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  except BaseException:
    failed.append(True)
    raise
  finally:
    if failed:
      time.sleep(settle_seconds)  # the pending reads finish and report while the hook is on
    sys.unraisablehook = previous


class Checkpoints:
  """Orbax checkpoints of (model + optimizer state, run metadata), one per finished epoch.

  The state is saved as the flat list of its leaves (typed PRNG keys as their raw data), the
  metadata as JSON with the SHA-256 of those leaves (see :func:`save_checkpoint`). Every checkpoint
  is read back and checked against its digest right after it is written; only then are older ones
  deleted, so the newest checkpoint that verifies is never deleted. :meth:`restore_newest` uses the
  newest one that verifies. Use it as a context manager, or call :meth:`close`.

  Attributes:
    directory: the folder of the checkpoints (``WORKDIR/checkpoints``).
    keep: how many verified checkpoints to keep.
    verified: the epochs of the checkpoints known to verify, oldest first.
  """

  def __init__(self, directory: pathlib.Path, keep: int = 2):
    self.directory = directory
    self.keep = keep
    self.verified: list[int] = []
    # Deletion is ours (see save), not Orbax's max_to_keep, which does not know what verifies.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=None, create=True, enable_async_checkpointing=False
    )
    self.manager = ocp.CheckpointManager(
      directory.absolute(), options=options, item_names=("state", "meta")
    )

  def latest(self) -> int | None:
    """The newest epoch whose checkpoint verifies (written or restored by this run), or None."""
    return self.verified[-1] if self.verified else None

  def meta_path(self, epoch: int) -> pathlib.Path:
    """The metadata file of the checkpoint of ``epoch``."""
    return self.directory / str(epoch) / "meta" / "metadata"

  def read_meta(self, epoch: int) -> dict[str, Any]:
    """The metadata of the checkpoint of ``epoch``; CheckpointError naming the file if unusable."""
    return read_meta_file(self.meta_path(epoch))

  def save(self, epoch: int, state: Any, meta: Mapping[str, Any]) -> bool:
    """Saves ``state`` and ``meta`` as the checkpoint of ``epoch``, reads it back and verifies it.

    Returns:
      Whether it verified. If so, checkpoints older than the ``keep`` newest verified ones are
      deleted; if not, it is reported in one line and deleted, and the older ones are kept.
    """
    meta = {**meta, "sha256": state_digest(host_leaves(state))}
    leaves = [_to_saveable(x) for x in jax.tree.leaves(state)]
    self.manager.save(
      epoch,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(leaves), meta=ocp.args.JsonSave(dict(meta))
      ),
    )
    self.manager.wait_until_finished()
    try:
      self.restore(epoch, state)
    except CheckpointError as e:
      say(f"warning: {self._describe(epoch)} {e}; deleted it")
      self.manager.delete(epoch)
      return False
    self.verified = [*self.verified, epoch][-self.keep :]
    if len(self.verified) == self.keep:
      for old in self.manager.all_steps():
        if old < self.verified[0]:
          self.manager.delete(old)
    return True

  def restore(self, epoch: int, like: Any) -> tuple[Any, dict[str, Any]]:
    """The state (with the tree structure, shardings and key types of ``like``) and the metadata.

    Raises:
      CheckpointError: the metadata is missing or garbled, the arrays do not restore, or they do
        not match the digest in the metadata.
    """
    meta = self.read_meta(epoch)
    like_leaves, treedef = jax.tree.flatten(like)
    abstract = [
      jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding)
      for s in map(_to_saveable, like_leaves)
    ]
    try:
      with _quiet_closed_event_loop():
        restored = self.manager.restore(
          epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )["state"]
    except Exception as e:  # Orbax and TensorStore raise many kinds; each means "unusable"
      raise CheckpointError(f"does not restore ({type(e).__name__}: {_first_line(e)})") from e
    if "sha256" in meta and state_digest(host_leaves(restored)) != meta["sha256"]:
      raise CheckpointError(f"has arrays that do not match the digest in {self.meta_path(epoch)}")
    leaves = [_from_saved(saved, ref) for saved, ref in zip(restored, like_leaves, strict=True)]
    return jax.tree.unflatten(treedef, leaves), meta

  def restore_newest(self, like: Any) -> tuple[Any, dict[str, Any]] | None:
    """The state and metadata of the newest checkpoint that verifies, or None if there is none.

    Each newer checkpoint that does not is reported in one line and deleted (its epochs are run
    again). When none verifies, all are left as they are and CheckpointError is raised.
    """
    failed: list[tuple[int, str]] = []
    for epoch in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, meta = self.restore(epoch, like)
      except CheckpointError as e:
        failed.append((epoch, f"{self._describe(epoch)} {e}"))
        continue
      for bad, reason in failed:
        say(f"warning: {reason}; deleted, continuing from epoch {epoch}")
        self.manager.delete(bad)
      if "sha256" not in meta:
        say(f"warning: {self._describe(epoch)} has no digest; used unverified")
      self.verified = [epoch]
      return state, meta
    if failed:
      raise CheckpointError(
        f"no checkpoint in {self.directory} can be used ({'; '.join(r for _, r in failed)}); "
        "pass --overwrite to start the run again or choose a new --workdir"
      )
    return None

  def _describe(self, epoch: int) -> str:
    return f"the checkpoint of epoch {epoch} in {self.directory}"

  def close(self) -> None:
    self.manager.close()

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def read_meta_file(path: pathlib.Path) -> dict[str, Any]:
  """A checkpoint's metadata; CheckpointError naming ``path`` when it is missing or garbled."""
  try:
    meta = json.loads(path.read_text())
  except FileNotFoundError as e:
    raise CheckpointError(f"has no metadata: {path} is missing") from e
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"has garbled metadata: {path} is not valid JSON ({e})") from e
  if not isinstance(meta, dict) or not all(k in meta for k in META_KEYS):
    raise CheckpointError(f"has garbled metadata: {path} lacks {', '.join(META_KEYS)}")
  return meta


def newest_meta(directory: pathlib.Path) -> dict[str, Any] | None:
  """The metadata of the newest checkpoint in ``directory`` whose metadata reads, or None if there
  is no checkpoint; CheckpointError (naming the newest one's file) if none reads."""
  if not directory.is_dir():
    return None
  steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)
  errors = []
  for epoch in steps:
    try:
      return read_meta_file(directory / str(epoch) / "meta" / "metadata")
    except CheckpointError as e:
      errors.append(f"the checkpoint of epoch {epoch} {e}")
  if errors:
    raise CheckpointError(f"no checkpoint in {directory} can be used: {'; '.join(errors)}")
  return None


def _relative(path: str | os.PathLike | None) -> str | None:
  """``path`` relative to the current folder (run.json records no absolute path of the machine)."""
  if path is None:
    return None
  try:
    return os.path.relpath(os.path.abspath(path))
  except ValueError:  # another drive (Windows)
    return pathlib.Path(path).name


def _jsonable_config(config: LoopConfig) -> dict[str, Any]:
  values = json.loads(json.dumps(dataclasses.asdict(config), default=repr))
  for name in ("workdir", "data_dir"):
    if name in values:
      values[name] = _relative(values[name])
  return values


def _check_same_run(
  saved: Mapping[str, Any], current: Mapping[str, Any], directory: pathlib.Path
) -> None:
  saved = {**ADDED_FIELDS, **saved}
  may_change = RESUMABLE_FIELDS | CHANGEABLE_ON_RESUME
  differ = sorted(
    k for k in set(saved) | set(current) if k not in may_change and saved.get(k) != current.get(k)
  )
  if differ:
    detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in differ)
    raise ValueError(
      f"cannot resume from {directory}: the run's settings differ ({detail}). Use the same "
      "settings (only --lr may change) or a new --workdir."
    )


# ---- the checks before any data is loaded or model built ----


def check_devices(config: LoopConfig) -> int:
  """The number of devices the run uses; ValueError if there are not enough, ``--mesh`` does not
  fit them, or the batch does not split over them.

  A multi-process run uses the devices of every process: all of them (``--devices`` may only
  name their number).
  """
  available = len(jax.devices())
  count = available if config.devices is None else config.devices
  processes = jax.process_count()
  if processes > 1 and count != available:
    raise ValueError(
      f"--devices {count} is not valid; a run of {processes} processes uses all their "
      f"{available} devices (shape them with --mesh)"
    )
  if count > available:
    raise ValueError(f"--devices {count} is not valid; this machine has {available} device(s)")
  mesh_sizes(config.mesh, count)
  if config.batch_size % count:
    raise ValueError(
      f"--batch-size {config.batch_size} is not valid; it must be a multiple of the {count} "
      "devices (see --devices)"
    )
  return count


def _check_hparam_type(key: str, value: Any, default: Any) -> None:
  if callable(value):
    return  # a schedule (e.g. of p), through the Python API; the optimizer checks it
  text = f"--hparam {key}={json.dumps(value, default=repr)} is not valid"
  if key in optimizers.DTYPE_HYPERPARAMS:
    if value is not None and optimizers.dtype_name(value) is None:
      raise ValueError(f"{text}; expected {optimizers.DTYPE_CHOICES}")
  elif isinstance(default, bool):
    if not isinstance(value, bool):
      raise ValueError(f"{text}; expected true or false")
  elif isinstance(default, int | float) or default is None:
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if default is None and value is None:
      return
    if not number or not math.isfinite(value):
      raise ValueError(f"{text}; expected a finite number (the default is {json.dumps(default)})")


def check_optimizer(config: LoopConfig, registry_task: str) -> None:
  """Raises ValueError for an unknown ``--hparam`` key, a value of the wrong type, or one the
  optimizer rejects when it is built (built here without data: no model, no compilation)."""
  defaults = optimizers.paper_hyperparams(config.optimizer, registry_task)
  for key, value in config.hparams.items():
    if key not in defaults:
      valid = ", ".join(sorted(k for k in defaults if k != "learning_rate"))
      raise ValueError(
        f"--hparam {key}={json.dumps(value, default=repr)} is not valid; {config.optimizer} has no "
        f"hyperparameter {key!r} (valid: {valid}; the base rate is --lr)"
      )
    _check_hparam_type(key, value, defaults[key])
  try:
    optimizers.make_optimizer(
      config.optimizer,
      task=registry_task,
      steps_per_epoch=1,
      epochs=config.epochs,
      batch_size=config.batch_size,
      train_size=config.batch_size,
      learning_rate=config.learning_rate,
      **dict(config.hparams),
    )
  except (TypeError, ValueError) as e:
    shown = " ".join(
      f"--hparam {k}={json.dumps(v, default=repr)}" for k, v in config.hparams.items()
    )
    raise ValueError(f"{config.optimizer} rejects its hyperparameters ({shown}): {e}") from e


def check_workdir(config: LoopConfig) -> None:
  """Raises ValueError unless ``--workdir`` (and its ``checkpoints/``) is a folder this process can
  write to: it is created, and a probe file is written and removed in each."""
  workdir = pathlib.Path(config.workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"--workdir {workdir} is not valid; it is a file, not a folder")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    for folder in (workdir, workdir / CHECKPOINTS_DIR):
      if folder.exists():
        probe = folder / f".write-probe-{jax.process_index()}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
  except OSError as e:
    where = e.filename or workdir
    raise ValueError(
      f"--workdir {workdir} is not valid; cannot write to {where} ({e.strerror or e})"
    ) from e


def previous_run_files(workdir: pathlib.Path) -> list[str]:
  """The names in ``workdir`` a previous run left there: metrics.jsonl, run.json, checkpoints/ (if
  it holds anything)."""
  found = []
  for name in PREVIOUS_RUN_FILES:
    path = workdir / name
    if path.is_dir() and any(path.iterdir()):
      found.append(f"{name}/")
    elif path.is_file():
      found.append(name)
  return found


def _recorded_epochs(workdir: pathlib.Path) -> int:
  path = metrics.metrics_path(workdir)
  if not path.is_file():
    return 0
  return sum(1 for line in path.read_text(errors="replace").splitlines() if line.strip())


def check_previous_run(config: LoopConfig) -> LoopConfig:
  """Applies the rule for a workdir that holds a previous run; returns the config to run.

  - No previous run's files: a new run (with or without ``--resume``).
  - ``--overwrite``: a new run; :func:`train` removes the previous files first.
  - ``--resume`` with a checkpoint: the settings must be the checkpoint's but ``--lr``, which
    defaults to the run's (returned in the config).
  - ``--resume`` without a checkpoint: a new run if ``metrics.jsonl`` records no finished epoch
    (nothing is lost), else refused.
  - Otherwise refused: ValueError, one line.
  """
  workdir = pathlib.Path(config.workdir)
  found = previous_run_files(workdir)
  if not found or config.overwrite:
    return config
  if not config.resume:
    raise ValueError(
      f"{workdir} holds a previous run ({', '.join(found)}); pass --resume to continue it, "
      "--overwrite to replace it, or choose a new --workdir"
    )
  meta = newest_meta(workdir / CHECKPOINTS_DIR)
  if meta is None:
    epochs = _recorded_epochs(workdir)
    if epochs:
      raise ValueError(
        f"cannot resume {workdir}: its metrics.jsonl records {epochs} finished epoch(s) but "
        "there is no checkpoint to continue from; pass --overwrite to start again or choose a "
        "new --workdir"
      )
    return config
  _check_same_run(meta["config"], _jsonable_config(config), workdir)
  saved_lr = meta["config"].get("learning_rate")
  if config.learning_rate is None and saved_lr is not None:
    config = dataclasses.replace(config, learning_rate=saved_lr)
  return config


def check_run(config: LoopConfig, registry_task: str) -> LoopConfig:
  """Every check that needs neither data nor a model, so that a bad option costs no time.

  The devices and batch (:func:`check_devices`), the optimizer's hyperparameters
  (:func:`check_optimizer`), the workdir (:func:`check_workdir`) and what it holds
  (:func:`check_previous_run`); the config's own values were checked when it was made. A trainer
  calls it before it loads its data; :func:`train` calls it again.

  Returns:
    The config to run (on ``--resume`` without ``--lr``, with the run's learning rate).
  """
  check_devices(config)
  check_optimizer(config, registry_task)
  check_workdir(config)
  return check_previous_run(config)


def check_same_data(config: LoopConfig, task: Task) -> None:
  """On ``--resume``, raises ValueError when the task's data differ from the checkpoint's."""
  if not config.resume:
    return
  meta = newest_meta(pathlib.Path(config.workdir) / CHECKPOINTS_DIR)
  saved = (meta or {}).get("data") or {}
  current = task.describe_data() or {}
  if saved.get("sha256") and current.get("sha256") and saved["sha256"] != current["sha256"]:
    raise ValueError(
      f"cannot resume {config.workdir}: its data differ from the checkpoint's (SHA-256 "
      f"{saved['sha256'][:16]}... of {saved.get('files')}, now {current['sha256'][:16]}... of "
      f"{current.get('files')}). Use the same data or a new --workdir."
    )


def check_same_on_every_process(config: LoopConfig, task: Task) -> None:
  """Raises ValueError, on every process, unless all processes of a multi-process run have the
  same settings and data (SHA-256 of both, compared through a collective); nothing in a single
  process. The folders (``workdir``, ``data_dir``) may be named differently on different hosts.
  Every process must call it: it also waits for them all."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  settings = {k: v for k, v in _jsonable_config(config).items() if k not in ("workdir", "data_dir")}
  text = json.dumps({"config": settings, "data": task.describe_data()}, sort_keys=True)
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
  digests = np.asarray(multihost_utils.process_allgather(digest))
  differ = [i for i, row in enumerate(digests) if not np.array_equal(row, digests[0])]
  if differ:
    raise ValueError(
      f"the processes of this run differ in their settings or data (process 0 and process(es) "
      f"{', '.join(map(str, differ))}): every process must run the same command (but "
      "--process-id) on the same data"
    )


def remove_previous_run(config: LoopConfig) -> None:
  """With ``--overwrite``, deletes the previous run's metrics.jsonl, run.json and checkpoints/.

  In a multi-process run the primary process deletes them, and every process waits for it.
  """
  workdir = pathlib.Path(config.workdir)
  found = previous_run_files(workdir)
  if not config.overwrite or not found:
    return
  if not is_primary():
    sync_processes("previous run removed")
    return
  for name in PREVIOUS_RUN_FILES:
    path = workdir / name
    if path.is_dir():
      shutil.rmtree(path)
    elif path.exists():
      path.unlink()
  say(f"Replaced the previous run in {workdir} ({', '.join(found)}).")
  sync_processes("previous run removed")


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
    shardings: where each array of the state lives on the mesh (:func:`state_shardings`).
  """

  train_graph: nnx.GraphDef
  eval_graph: nnx.GraphDef
  num_params: int
  shardings: Any = None


def _create(
  task: Task, tx: optax.GradientTransformation, root: jax.Array
) -> tuple[nnx.Module, nnx.Optimizer]:
  model = task.init_model(
    nnx.Rngs(params=jax.random.fold_in(root, 0), dropout=jax.random.fold_in(root, 2))
  )
  return model, nnx.Optimizer(model, task.transform(tx), wrt=nnx.Param)


def make_state(
  task: Task, tx: optax.GradientTransformation, root: jax.Array, mesh: jax.sharding.Mesh
) -> tuple[Model, nnx.State]:
  """Initializes the task's model and an ``nnx.Optimizer`` with ``task.transform(tx)`` from ``root``.

  The parameters are drawn from ``fold_in(root, 0)`` and the dropout stream from
  ``fold_in(root, 2)``. One jitted program creates every array where it lives on ``mesh``
  (:func:`state_shardings`): a split array is never whole on one device.

  Returns:
    The model's graphs and the state of (model, optimizer) (parameters, batch statistics, RNG
    streams, optimizer state), laid out over ``mesh``.
  """
  model, optimizer = nnx.eval_shape(functools.partial(_create, task, tx), root)
  model.train()
  train_graph, abstract = nnx.split((model, optimizer))
  model.eval()
  eval_graph = nnx.graphdef((model, optimizer))
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  shardings = state_shardings(abstract, mesh)

  # One compiled program for all initializers: eagerly, XLA:CPU compiles a random-number kernel per
  # parameter shape, which costs seconds each on a small CPU.
  @functools.partial(jax.jit, out_shardings=shardings)
  def create(root):
    return nnx.split(_create(task, tx, root))[1]

  state = create(root)
  return Model(train_graph, eval_graph, int(num_params), shardings), state


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
  Both steps take and give the state in its layout (``model.shardings``) and batches split over
  every device of the mesh.

  Attributes:
    mesh: the ``data`` x ``fsdp`` mesh.
    num_devices: devices the batch axis is split over (all of the mesh's).
    replicated: the sharding of the metric sums (and of the state's small arrays).
    batch_sharded: the sharding of batches and carries (leading axis over every mesh axis).
    eval: the jitted eval step, ``(state, carry, batch) -> (carry, sums)``.
  """

  def __init__(self, task: Task, model: Model, mesh: jax.sharding.Mesh):
    self.mesh = mesh
    self.num_devices = mesh.devices.size
    self.replicated = NamedSharding(mesh, P())
    self.batch_sharded = NamedSharding(mesh, P(MESH_AXES))
    self._task = task
    self._train_graph = model.train_graph
    state = model.shardings
    # The key and the step index are host values of every process (None: replicated).
    self._train = jax.jit(
      functools.partial(_train_step, task, model.train_graph),
      donate_argnums=(0, 1, 2),
      in_shardings=(state, self.batch_sharded, self.replicated, self.batch_sharded, None, None),
      out_shardings=(state, self.batch_sharded, self.replicated),
    )
    self._compiled = None
    self.eval = jax.jit(
      functools.partial(_eval_step, task, model.eval_graph),
      in_shardings=(state, self.batch_sharded, self.batch_sharded),
      out_shardings=(self.batch_sharded, self.replicated),
    )

  def shard(self, tree: Any) -> Any:
    """Places a batch (or carry) with its leading axis split over the devices.

    In a multi-process run every process holds the same global batch (the same data, order and
    seed); each places only the rows of its own devices.
    """
    if jax.process_count() == 1:
      return jax.device_put(tree, self.batch_sharded)
    return jax.tree.map(lambda x: _global_array(np.asarray(x), self.batch_sharded), tree)

  def zero_sums(self, state: Any, carry: Carry, batch: Batch, key: jax.Array) -> Sums:
    """Zeros for each metric sum the task's loss returns (found by tracing it, not running it)."""

    def batch_sums(state, carry, batch):
      model, _ = nnx.merge(self._train_graph, state)
      return self._task.loss(model, batch, carry, key, train=True)[1][1]

    keys = jax.eval_shape(batch_sums, state, carry, batch)
    if "count" not in keys:
      raise ValueError("Task.loss must return sums with a 'count' entry")
    return {k: jax.device_put(np.zeros((), np.float32), self.replicated) for k in keys}

  def compile(self, state: Any, carry: Carry, sums: Sums, batch: Batch, key: jax.Array) -> None:
    """Compiles the train step for these shapes, once per run."""
    if self._compiled is None:
      self._compiled = self._train.lower(state, carry, sums, batch, key, np.int32(0)).compile()

  def train(
    self, state: Any, carry: Carry, sums: Sums, batch: Batch, key: jax.Array, index: int
  ) -> tuple[Any, Carry, Sums]:
    """One optimizer step; ``state``, ``carry`` and ``sums`` are donated."""
    return self._compiled(state, carry, sums, batch, key, np.int32(index))


@dataclasses.dataclass
class RunState:
  """Where a run stands after its last finished epoch.

  Attributes:
    state: the model and optimizer state.
    root: the run's root PRNG key (every epoch's key is derived from it).
    history: one record per finished epoch.
    epoch: the last finished epoch (0 before the first).
    resumptions: one record per resumption: the epoch it continued after and the settings it
      changed (``{"learning_rate": [old, new]}``).
  """

  state: Any
  root: jax.Array
  history: list[dict[str, Any]]
  epoch: int = 0
  resumptions: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _resumption(meta: Mapping[str, Any], config: LoopConfig) -> dict[str, Any]:
  """The record of a resumption: the epoch it continues after and the settings it changed."""
  current = _jsonable_config(config)
  changed = {
    k: [meta["config"].get(k), current.get(k)]
    for k in sorted(CHANGEABLE_ON_RESUME)
    if meta["config"].get(k) != current.get(k)
  }
  return {"after_epoch": int(meta["epoch"]), "changed": changed}


def _write_history(workdir: pathlib.Path, history: list[dict[str, Any]]) -> None:
  if is_primary():
    metrics.write_metrics(workdir, history)


def restore_or_start(
  checkpoints: Checkpoints, state: Any, root: jax.Array, task: Task, config: LoopConfig
) -> RunState:
  """The run from its newest checkpoint that verifies (with ``config.resume``), or a fresh one.

  Either way ``WORKDIR/metrics.jsonl`` is rewritten to the history so far.

  Raises:
    ValueError: when there are checkpoints but no ``config.resume``, the checkpoint's settings
      differ from ``config``'s (but the learning rate), or no checkpoint verifies.
  """
  workdir = pathlib.Path(config.workdir)
  if not config.resume:
    if checkpoints.manager.all_steps():
      raise ValueError(
        f"{workdir} already holds checkpoints; pass --resume to continue that run, --overwrite "
        "to replace it, or choose a new --workdir"
      )
    _write_history(workdir, [])
    return RunState(state, root, [])
  restored = checkpoints.restore_newest(state)
  if restored is None:
    _write_history(workdir, [])
    return RunState(state, root, [])
  state, meta = restored
  _check_same_run(meta["config"], _jsonable_config(config), workdir)
  task.restore_checkpoint_state(meta.get("task", {}))
  run = RunState(
    state=state,
    root=jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32)),
    history=list(meta["history"]),
    epoch=int(meta["epoch"]),
    resumptions=[*meta.get("resumptions", []), _resumption(meta, config)],
  )
  _write_history(workdir, run.history)
  say(f"Resumed {workdir} after epoch {meta['epoch']} of {config.epochs}.")
  return run


def _bytes_on_devices(arrays: Iterable[jax.Array]) -> tuple[int, int]:
  """The most bytes of ``arrays`` that any one device holds, and the bytes of the whole arrays."""
  per_device: dict[Any, int] = {}
  total = 0
  for x in arrays:
    total += x.size * x.dtype.itemsize
    for shard in x.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  most = max(per_device.values(), default=0)
  if jax.process_count() > 1:  # the fullest device of any process (as 8 bytes: no int64 in JAX)
    from jax.experimental import multihost_utils

    mine = np.frombuffer(int(most).to_bytes(8, "little"), np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(mine))
    most = max(int.from_bytes(row.tobytes(), "little") for row in gathered)
  return int(most), int(total)


def state_memory(state: Any) -> dict[str, int]:
  """The bytes of the parameters and of the optimizer state, whole and on the fullest device.

  Measured from the arrays' shards: ``*_bytes_per_device`` is the most that one device holds (a
  replicated array counts whole on every device); ``param_bytes`` and ``optimizer_state_bytes``
  are the arrays' unsplit sizes. ``state`` is the state of (model, optimizer) of
  :func:`make_state`; the optimizer state is everything of the optimizer (moments, counters).
  """
  model_state, optimizer_state = state[0], state[1]
  params = jax.tree.leaves(nnx.filter_state(model_state, nnx.Param))
  optimizer_arrays = jax.tree.leaves(optimizer_state)
  param_most, param_total = _bytes_on_devices(params)
  state_most, state_total = _bytes_on_devices(optimizer_arrays)
  return {
    "param_bytes": param_total,
    "param_bytes_per_device": param_most,
    "optimizer_state_bytes": state_total,
    "optimizer_state_bytes_per_device": state_most,
  }


def write_run_info(
  task: Task,
  config: LoopConfig,
  setup: optimizers.OptimizerSetup,
  model: Model,
  steps: Steps,
  run: RunState,
) -> None:
  """Writes ``WORKDIR/run.json``: the config (paths relative to the current folder), the data's
  identity, the optimizer hyperparameters, devices, the mesh and the memory of the state on it
  (:func:`state_memory`), versions, and the resumptions so far.

  Every process of a multi-process run calls it (the memory is measured on all of them); the
  primary one writes the file.
  """
  memory = state_memory(run.state)
  if not is_primary():
    return
  run_info = {
    "config": _jsonable_config(config),
    "task": type(task).__name__,
    "data": task.describe_data(),
    "optimizer": setup.hyperparams,
    "num_params": model.num_params,
    "devices": [str(d) for d in steps.mesh.devices.flat],
    "process_count": jax.process_count(),
    "mesh": dict(steps.mesh.shape),
    **memory,
    "jax": jax.__version__,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "resumptions": run.resumptions,
  }
  path = pathlib.Path(config.workdir) / metrics.RUN_FILE
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(run_info, indent=2) + "\n")
  os.replace(tmp, path)


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
  live: Mapping[str, float],
  epoch: int,
  step: int,
  checkpoints: Checkpoints,
  learning_rate: float | None = None,
) -> None:
  """Raises :class:`NonFiniteLossError` when a live training metric is NaN or infinite.

  ``learning_rate`` (the run's base rate) makes the message suggest a lower one.
  """
  if not all(math.isfinite(v) for v in live.values()):
    shown = ", ".join(f"{k}={v}" for k, v in live.items())
    what = f"non-finite training loss in epoch {epoch} by step {step} ({shown})"
    raise NonFiniteLossError(_non_finite_message(what, checkpoints, learning_rate))


@jax.jit
def _non_finite_flags(state: Any) -> Any:
  """Per array of ``state``: whether it holds a NaN or an infinity (one program for them all)."""
  return jax.tree.map(
    lambda x: (
      ~jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.zeros((), bool)
    ),
    state,
  )


def non_finite_arrays(state: Any) -> list[str]:
  """The paths of the floating-point arrays of ``state`` that hold a NaN or an infinity."""
  flat, _ = jax.tree_util.tree_flatten_with_path(_non_finite_flags(state))
  return [jax.tree_util.keystr(path) for path, bad in flat if bool(host_value(bad))]


def check_finite_state(
  state: Any, epoch: int, checkpoints: Checkpoints, learning_rate: float | None = None
) -> None:
  """Raises :class:`NonFiniteLossError` when a parameter, optimizer-state or batch-statistics array
  holds a NaN or an infinity (the state is then not checkpointed)."""
  bad = non_finite_arrays(state)
  if bad:
    total = len(jax.tree.leaves(state))
    shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
    what = (
      f"non-finite values in {len(bad)} of the {total} arrays of the state after epoch {epoch} "
      f"({shown}); its checkpoint was not written"
    )
    raise NonFiniteLossError(_non_finite_message(what, checkpoints, learning_rate))


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
  learning_rate: float | None = None,
) -> tuple[Any, EpochTraining]:
  """Runs the ``steps_per_epoch`` train steps of ``epoch``; returns the new state and the sums.

  Every ``log_every`` steps (and at the last) the sums are fetched: the progress bar shows them and
  :func:`check_finite` stops the run on a non-finite loss (``learning_rate``: the base rate its
  message suggests lowering).
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
      bar = _ProgressBar(
        task.steps_per_epoch, desc, task.unit, start, config.progress and is_primary()
      )
    state, carry, sums = steps.train(state, carry, sums, batch, key, index)
    if (index + 1) % log_every == 0 or index + 1 == task.steps_per_epoch:
      host = {k: float(v) for k, v in sums.items()}
      live = task.summarize(host)
      check_finite(live, epoch, index + 1, checkpoints, learning_rate)
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


def evaluate(
  steps: Steps, state: Any, task: Task, *, epoch: int = 0, final: bool = False
) -> tuple[dict[str, float], float]:
  """The task's end-of-epoch evaluation of ``state`` and its seconds."""
  start = time.perf_counter()
  evaluator = Evaluator(steps.eval, state, steps.shard, steps.num_devices, epoch=epoch, final=final)
  evaluation = task.evaluate(evaluator)
  return evaluation, time.perf_counter() - start


def due(epoch: int, every: int, last: int) -> bool:
  """Whether something done every ``every`` epochs and after epoch ``last`` is due after ``epoch``."""
  return epoch % every == 0 or epoch == last


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
  checkpoints: Checkpoints,
  run: RunState,
  task: Task,
  config: LoopConfig,
  data: Mapping[str, Any] | None = None,
) -> None:
  """Saves and verifies the checkpoint of ``run.epoch``: the state, and as metadata the epoch, the
  history, the config, the root key, the task's :meth:`Task.checkpoint_state`, the data's identity
  and the resumptions (with the state's SHA-256, added by :meth:`Checkpoints.save`)."""
  meta = {
    "epoch": run.epoch,
    "history": run.history,
    "config": _jsonable_config(config),
    "rng": np.asarray(jax.random.key_data(run.root)).tolist(),
    "task": task.checkpoint_state(),
    "data": data,
    "resumptions": run.resumptions,
  }
  checkpoints.save(run.epoch, run.state, meta)


def record_epoch(
  run: RunState,
  state: Any,
  record: dict[str, Any],
  checkpoints: Checkpoints,
  task: Task,
  config: LoopConfig,
  setup: optimizers.OptimizerSetup | None = None,
) -> None:
  """Adds a finished epoch to ``run``: its history, a checkpoint (when due: every
  ``checkpoint_every`` epochs and after the last of this invocation), metrics.jsonl, a printed line.

  A state with a non-finite array stops the run (:func:`check_finite_state`) before anything of
  the epoch is written.
  """
  base_lr = None if setup is None else setup.hyperparams.get("learning_rate")
  check_finite_state(state, record["epoch"], checkpoints, base_lr)
  run.state = state
  run.epoch = record["epoch"]
  run.history.append(record)
  if due(run.epoch, config.checkpoint_every, last_epoch(config)):
    save_checkpoint(checkpoints, run, task, config, task.describe_data())
  if is_primary():
    metrics.append_metrics(config.workdir, record)
  shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("epoch", "step"))
  say(f"epoch {run.epoch}/{config.epochs}: {shown}")


def train(task: Task, config: LoopConfig, *, log_every: int = 10) -> list[dict[str, Any]]:
  """Trains ``task`` as ``config`` says and returns the per-epoch records (also in metrics.jsonl).

  Args:
    task: the problem.
    config: the run's settings (a :class:`LoopConfig`, usually a task's subclass of it).
    log_every: steps between progress-bar updates and non-finite checks (each is a device sync).

  Returns:
    The run's history: one dict per epoch, from epoch 1 (restored epochs included on resume).

  Raises:
    NonFiniteLossError: when the training loss or the state becomes NaN or infinite.
    ValueError: for bad settings, a workdir holding another run, or a resume from a checkpoint
      made with other settings or data (or when none verifies).
  """
  config = check_run(config, task.registry_task)
  if config.dtype == "float16":
    say(FLOAT16_WARNING)
  mesh = make_mesh(config.devices, config.mesh)
  check_settings(task, config, mesh)
  check_same_data(config, task)
  setup = make_optimizer(task, config)
  # Every process has checked the workdir before any of them changes it.
  check_same_on_every_process(config, task)
  remove_previous_run(config)
  root = jax.random.key(config.seed)
  model, state = make_state(task, setup.tx, root, mesh)
  steps = Steps(task, model, mesh)
  with Checkpoints(pathlib.Path(config.workdir) / CHECKPOINTS_DIR) as checkpoints:
    run = restore_or_start(checkpoints, state, root, task, config)
    del state  # a restored run replaces it; from here on the run holds the state
    write_run_info(task, config, setup, model, steps, run)
    stopped = pathlib.Path(config.workdir) / metrics.STOPPED_FILE
    if is_primary():
      stopped.unlink(missing_ok=True)
    try:
      run_epochs(run, task, config, setup, steps, checkpoints, log_every=log_every)
    except NonFiniteLossError as e:
      if is_primary():
        stopped.write_text(json.dumps({"after_epoch": run.epoch, "reason": str(e)}) + "\n")
      raise
  return run.history


def run_epochs(
  run: RunState,
  task: Task,
  config: LoopConfig,
  setup: optimizers.OptimizerSetup,
  steps: Steps,
  checkpoints: Checkpoints,
  *,
  log_every: int = 10,
) -> None:
  """Trains, evaluates (when due) and records the epochs after ``run.epoch`` up to the last."""
  base_lr = setup.hyperparams.get("learning_rate")
  for epoch in range(run.epoch + 1, last_epoch(config) + 1):
    key = epoch_key(run.root, epoch)
    state, trained = train_epoch(
      steps,
      run.state,
      task,
      config,
      epoch,
      checkpoints,
      key=key,
      log_every=log_every,
      learning_rate=base_lr,
    )
    if due(epoch, config.eval_every, config.epochs):
      final = epoch == config.epochs
      evaluation, eval_seconds = evaluate(steps, state, task, epoch=epoch, final=final)
    else:
      evaluation, eval_seconds = {}, 0.0
    record = epoch_record(epoch, task, setup, trained, evaluation, eval_seconds)
    record_epoch(run, state, record, checkpoints, task, config, setup)


def _global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _non_finite_message(what: str, checkpoints: Checkpoints, learning_rate: float | None) -> str:
  last = checkpoints.latest()
  lower = "a lower --lr" if learning_rate is None else f"a lower --lr (e.g. {learning_rate / 10:g})"
  if last is None:
    forward = (
      f"No epoch had finished, so there is no checkpoint: start again with --overwrite and {lower}."
    )
  else:
    forward = (
      f"The last finite checkpoint, of epoch {last}, is kept in {checkpoints.directory}: continue "
      f"from it with --resume and {lower}; the new base rate keeps the decay steps."
    )
  return f"{what}; stopping. {forward}"
