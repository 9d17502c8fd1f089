"""One epoch of training: its steps run a call at a time, each call one step on a batch from the
host or several steps cutting their batches on the devices (``--steps-per-call``); after each
call the live metrics are checked and shown, and a signal or the clock saves a checkpoint inside
the epoch."""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax

from examples import optimizers
from examples.training import devices, records, settings
from examples.training.checkpoints import CHECKPOINTS_DIR, Checkpoints
from examples.training.divergence import check_finite, check_finite_state
from examples.training.preemption import Preempted, Stops
from examples.training.progress import ProgressBar
from examples.training.records import RunState
from examples.training.settings import LoopConfig
from examples.training.steps import Steps
from examples.training.task import Task


@dataclasses.dataclass
class Context:
  """What every epoch of a run uses: the task, settings, optimizer, steps, checkpoints, stops and
  the training data on the devices."""

  task: Task
  config: LoopConfig
  setup: optimizers.OptimizerSetup
  steps: Steps
  checkpoints: Checkpoints
  stops: Stops
  log_every: int = 10
  data: Any = None  # the task's train_data on the devices, or None

  @property
  def base_lr(self) -> float | None:
    return self.setup.hyperparams.get("learning_rate")


@dataclasses.dataclass(frozen=True)
class EpochTraining:
  """What :func:`train_epoch` measured.

  Attributes:
    sums: the epoch's metric sums (``task.loss``'s ``sums`` over its steps), as Python floats.
    seconds: time of the steps, compilation excluded (with a resumed epoch's earlier steps).
    save: whether a checkpoint is due at the epoch's end whatever ``--checkpoint-every`` says
      (a stop or the clock fell on its last step).
    stop: whether the run stops after this epoch (a signal fell on its last step).
  """

  sums: dict[str, float]
  seconds: float
  save: bool = False
  stop: bool = False


def epoch_key(root: jax.Array, epoch: int) -> jax.Array:
  """The key of ``epoch`` (batches; ``fold_in(key, step)`` inside each step)."""
  return jax.random.fold_in(jax.random.fold_in(root, 1), epoch)


def save_inside_epoch(
  ctx: Context, run: RunState, state: Any, carry: Any, sums: Mapping[str, float], step: int, seconds
) -> None:
  """Saves a checkpoint ``step`` steps into epoch ``run.epoch + 1``: the state and carry, and as
  its position the step, the sums so far and their seconds (a finite state only)."""
  where = f"at step {step} of epoch {run.epoch + 1}"
  check_finite_state(state, where, ctx.checkpoints, ctx.base_lr)
  at = dataclasses.replace(run, state=state)
  inside = {"step": step, "sums": dict(sums), "seconds": seconds}
  meta = records.checkpoint_meta(at, ctx.task, ctx.config, inside)
  with ctx.stops.saving():
    ctx.checkpoints.save(run.epoch * ctx.task.steps_per_epoch + step, (state, carry), meta)


def preempted(ctx: Context, where: str) -> Preempted:
  config = ctx.config
  return Preempted(
    f"stopped by {ctx.stops.reason} {where}; the checkpoint is in "
    f"{pathlib.Path(config.workdir) / CHECKPOINTS_DIR}: continue with the same command and "
    "--resume"
  )


@dataclasses.dataclass
class _Progress:
  """An epoch in progress: where it started, the sums it started from, its clock and bar, and
  what is due at its end."""

  ctx: Context
  run: RunState
  epoch: int
  first: int
  start_sums: Mapping[str, float]
  before: float
  start: float = 0.0
  bar: ProgressBar | None = None
  save_at_end: bool = False
  stop_at_end: bool = False

  def begin(self) -> None:
    """Starts the clock (after compiling) and the bar."""
    self.start = time.perf_counter()
    config, task = self.ctx.config, self.ctx.task
    enabled = config.progress and devices.is_primary()
    desc = f"epoch {self.epoch}/{config.epochs}"
    self.bar = ProgressBar(
      task.steps_per_epoch, desc, task.unit, self.start, enabled, initial=self.first
    )

  def seconds(self) -> float:
    return self.before + (time.perf_counter() - self.start if self.bar is not None else 0.0)

  def show(self, done: int, sums: Mapping[str, Any]) -> dict[str, float]:
    """Reads ``sums`` (after ``done`` steps), stops on a non-finite loss, moves the bar."""
    host = {k: float(v) for k, v in sums.items()}
    live = self.ctx.task.summarize(host)
    where = f"training loss in epoch {self.epoch} by step {done}"
    check_finite(live, where, self.ctx.checkpoints, self.ctx.base_lr, self.ctx.task.chance_loss)
    self.bar.show(done, live, host["count"] - self.start_sums.get("count", 0.0))
    return host

  def after_call(self, done: int, steps: int, state, carry, sums: Mapping[str, Any]) -> None:
    """After a call that ran ``steps`` steps up to ``done``: a save or a stop that is due."""
    spe = self.ctx.task.steps_per_epoch
    save, stop = self.ctx.stops.check((self.epoch - 1) * spe + done, steps)
    if done == spe:
      self.save_at_end, self.stop_at_end = save, stop
      return
    if not save:
      return
    host = self.show(done, sums)
    if stop:
      self.bar.close()
    save_inside_epoch(self.ctx, self.run, state, carry, host, done, self.seconds())
    if stop:
      raise preempted(self.ctx, f"at step {done} of {spe} of epoch {self.epoch}")

  def end(self, state, sums: Mapping[str, Any] | None) -> EpochTraining:
    jax.block_until_ready(state)
    seconds = self.seconds()
    host = {k: float(v) for k, v in sums.items()} if sums is not None else dict(self.start_sums)
    if self.bar is not None:
      self.bar.close()
    return EpochTraining(host, seconds, self.save_at_end, self.stop_at_end)


def train_epoch(
  ctx: Context, run: RunState, epoch: int, key: jax.Array
) -> tuple[Any, EpochTraining]:
  """Runs the train steps of ``epoch`` (from ``run.step`` on, for a run resumed inside it); returns
  the new state and what it measured.

  A task with :meth:`~examples.training.task.Task.train_data` runs ``--steps-per-call`` steps a
  call (:func:`_device_epoch`); one whose batches come from the host, a step a call
  (:func:`_host_epoch`). After every call :class:`Stops` says whether to save a checkpoint (the
  clock) and whether to stop (a signal): inside the epoch the checkpoint is saved at once and a
  stop raises :class:`Preempted`; on its last step both wait for the epoch's end.
  """
  first = run.step if epoch == run.epoch + 1 else 0
  progress = _Progress(
    ctx,
    run,
    epoch,
    first,
    start_sums=run.sums if first else {},
    before=run.seconds if first else 0.0,
  )
  carry = run.carry if first else ctx.steps.shard(ctx.task.init_carry(ctx.config.batch_size))
  if ctx.data is not None:
    return _device_epoch(ctx, progress, run.state, carry, key)
  return _host_epoch(ctx, progress, run.state, carry, key)


def steps_per_call(config: LoopConfig) -> int:
  """``--steps-per-call``, or its default: 1 on a CPU (XLA:CPU runs a convolution inside a loop
  many times slower than outside one), else
  :data:`~examples.training.settings.DEFAULT_STEPS_PER_CALL`."""
  if config.steps_per_call is not None:
    return config.steps_per_call
  return 1 if jax.default_backend() == "cpu" else settings.DEFAULT_STEPS_PER_CALL


def _calls(config: LoopConfig, steps_left: int) -> list[int]:
  """The steps of each call that runs the ``steps_left`` steps of an epoch."""
  every = steps_per_call(config)
  return [every] * (steps_left // every) + ([steps_left % every] if steps_left % every else [])


def _device_epoch(
  ctx: Context, progress: _Progress, state, carry, key
) -> tuple[Any, EpochTraining]:
  """The epoch as calls of several steps, each cutting its batches on the devices. The host reads
  a call's sums (every ``log_every`` steps, and at the end) only after it has dispatched the next
  call, so the devices never wait for it."""
  steps, spe = ctx.steps, ctx.task.steps_per_epoch
  order = steps.epoch_order(key)
  done = progress.first
  sums = steps.chunk_sums(state, carry, ctx.data, order, key, progress.start_sums)
  # Compile before the clock starts so epoch times and throughput measure training only.
  calls = _calls(ctx.config, spe - done)
  for loop in sorted({n > 1 for n in calls}):
    steps.compile_chunk(state, carry, sums, ctx.data, order, key, loop)
  pending = None  # (steps done, the sums then) of the call whose sums are not read yet
  shown = done  # the steps whose sums were read last: they are read every log_every steps
  progress.begin()
  for n in calls:
    state, carry, sums, snapshot = steps.train_chunk(
      state, carry, sums, ctx.data, order, key, done, n
    )
    done += n
    if pending is not None and pending[0] - shown >= ctx.log_every:
      progress.show(*pending)
      shown = pending[0]
    pending = (done, snapshot)
    progress.after_call(done, n, state, carry, snapshot)
  if pending is not None:
    progress.show(*pending)
  return state, progress.end(state, sums if done > progress.first else None)


def _host_epoch(ctx: Context, progress: _Progress, state, carry, key) -> tuple[Any, EpochTraining]:
  """The epoch as one call per step, on the batches ``train_batches`` yields. Every ``log_every``
  steps (and at the last) the sums are read."""
  task, steps = ctx.task, ctx.steps
  sums = None
  done = progress.first
  batches = task.train_batches(progress.epoch, key, **_start(progress.first))
  for index, batch in enumerate(batches, progress.first):
    if index >= task.steps_per_epoch:
      raise ValueError(
        f"train_batches yielded more than steps_per_epoch={task.steps_per_epoch} batches"
      )
    batch = steps.shard(batch)
    if sums is None:
      sums = steps.zero_sums(state, carry, batch, key, progress.start_sums)
      # Compile before the clock starts so epoch times and throughput measure training only.
      steps.compile(state, carry, sums, batch, key)
      progress.begin()
    state, carry, sums = steps.train(state, carry, sums, batch, key, index)
    done = index + 1
    if done % ctx.log_every == 0 or done == task.steps_per_epoch:
      progress.show(done, sums)
    progress.after_call(done, 1, state, carry, sums)
  if done != task.steps_per_epoch:
    raise ValueError(
      f"train_batches yielded fewer than steps_per_epoch={task.steps_per_epoch} batches"
    )
  return state, progress.end(state, sums)


def _start(first: int) -> dict[str, int]:
  # Tasks written before runs could stop inside an epoch take no ``start``; they start at 0 only.
  return {"start": first} if first else {}
