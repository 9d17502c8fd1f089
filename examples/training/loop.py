"""The loop: :func:`train` runs a :class:`~examples.training.task.Task` epoch by epoch, the same way
for every task, and stops cleanly on a non-finite loss or on a signal.

:func:`train` reads as its steps: :func:`~examples.training.records.check_run` (every option, the
workdir and what it holds, before a trainer loads its data), the mesh, the data check, the
registry's optimizer, :func:`~examples.training.records.hold_workdir`, the model and optimizer
state and the jitted steps (:mod:`examples.training.steps`),
:func:`~examples.training.records.restore_or_start`, then per epoch :func:`train_epoch`,
:func:`evaluate` and :func:`record_epoch`.

Randomness is derived, never carried: epoch ``e`` uses ``fold_in(fold_in(root, 1), e)`` for its
batches and ``fold_in(that, step)`` inside each step, so a resumed run replays exactly what an
uninterrupted one would have done, from an epoch's start or from inside it.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from examples import cli, metrics, optimizers
from examples.training import devices, records, settings
from examples.training.checkpoints import CHECKPOINTS_DIR, Checkpoints
from examples.training.preemption import Preempted, Stops
from examples.training.progress import ProgressBar, show_epoch
from examples.training.records import RunState
from examples.training.settings import LoopConfig
from examples.training.steps import Steps, make_state
from examples.training.task import Evaluator, Task


class NonFiniteLossError(cli.RunStopped):
  """The training loss, an evaluation metric or the state became NaN or infinite; the run stopped,
  its last finite checkpoint kept."""

  exit_status = cli.EXIT_NON_FINITE


@dataclasses.dataclass
class Context:
  """What every epoch of a run uses: the task, settings, optimizer, steps, checkpoints and stops."""

  task: Task
  config: LoopConfig
  setup: optimizers.OptimizerSetup
  steps: Steps
  checkpoints: Checkpoints
  stops: Stops
  log_every: int = 10

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


def due(epoch: int, every: int, last: int) -> bool:
  """Whether something done every ``every`` epochs and after epoch ``last`` is due after ``epoch``."""
  return epoch % every == 0 or epoch == last


def _non_finite_message(what: str, checkpoints: Checkpoints, learning_rate: float | None) -> str:
  last = checkpoints.latest()
  lower = "a lower --lr" if learning_rate is None else f"a lower --lr (e.g. {learning_rate / 10:g})"
  if last is None:
    forward = (
      f"There is no checkpoint with finite metrics: start again with --overwrite and {lower}."
    )
  else:
    forward = (
      f"The last finite checkpoint, after {last}, is kept in {checkpoints.directory}: continue "
      f"from it with --resume and {lower}; the new base rate keeps the decay steps."
    )
  return f"{what}; stopping. {forward}"


def check_finite(
  live: Mapping[str, float],
  what: str,
  checkpoints: Checkpoints,
  learning_rate: float | None = None,
) -> None:
  """Raises :class:`NonFiniteLossError` when a metric of ``live`` is NaN or infinite.

  ``what`` says which metrics (``training loss in epoch 3 by step 40``); ``learning_rate`` (the
  run's base rate) makes the message suggest a lower one.
  """
  if not all(math.isfinite(v) for v in live.values()):
    shown = ", ".join(f"{k}={v}" for k, v in live.items())
    raise NonFiniteLossError(
      _non_finite_message(f"non-finite {what} ({shown})", checkpoints, learning_rate)
    )


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
  return [jax.tree_util.keystr(path) for path, bad in flat if bool(devices.host_value(bad))]


def check_finite_state(
  state: Any, where: str, checkpoints: Checkpoints, learning_rate: float | None = None
) -> None:
  """Raises :class:`NonFiniteLossError` when a parameter, optimizer-state or batch-statistics array
  holds a NaN or an infinity (the state is then not checkpointed); ``where``: ``after epoch 3``."""
  bad = non_finite_arrays(state)
  if bad:
    total = len(jax.tree.leaves(state))
    shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
    what = (
      f"non-finite values in {len(bad)} of the {total} arrays of the state {where} ({shown}); "
      "its checkpoint was not written"
    )
    raise NonFiniteLossError(_non_finite_message(what, checkpoints, learning_rate))


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


def _preempted(ctx: Context, where: str) -> Preempted:
  config = ctx.config
  return Preempted(
    f"stopped by {ctx.stops.reason} {where}; the checkpoint is in "
    f"{pathlib.Path(config.workdir) / CHECKPOINTS_DIR}: continue with the same command and "
    "--resume"
  )


def _host_sums(sums: Mapping[str, jax.Array]) -> dict[str, float]:
  return {k: float(v) for k, v in sums.items()}


def train_epoch(
  ctx: Context, run: RunState, epoch: int, key: jax.Array
) -> tuple[Any, EpochTraining]:
  """Runs the train steps of ``epoch`` (from ``run.step`` on, for a run resumed inside it); returns
  the new state and what it measured.

  Every ``log_every`` steps (and at the last) the sums are fetched: the progress bar shows them and
  a non-finite loss stops the run. After every step :class:`Stops` says whether to save a
  checkpoint (the clock) and whether to stop (a signal): inside the epoch the checkpoint is saved
  at once and a stop raises :class:`Preempted`; on its last step both wait for the epoch's end.
  """
  task, config, steps = ctx.task, ctx.config, ctx.steps
  first = run.step if epoch == run.epoch + 1 else 0
  carry = run.carry if first else steps.shard(task.init_carry(config.batch_size))
  state, start_sums, before = (
    run.state,
    (run.sums if first else {}),
    (run.seconds if first else 0.0),
  )
  sums = bar = start = None
  done, save_at_end, stop_at_end = first, False, False
  for index, batch in enumerate(task.train_batches(epoch, key, **_start(first)), first):
    if index >= task.steps_per_epoch:
      raise ValueError(
        f"train_batches yielded more than steps_per_epoch={task.steps_per_epoch} batches"
      )
    batch = steps.shard(batch)
    if start is None:
      sums = steps.zero_sums(state, carry, batch, key, start_sums)
      # Compile before the clock starts so epoch times and throughput measure training only.
      steps.compile(state, carry, sums, batch, key)
      start = time.perf_counter()
      desc = f"epoch {epoch}/{config.epochs}"
      enabled = config.progress and devices.is_primary()
      bar = ProgressBar(task.steps_per_epoch, desc, task.unit, start, enabled, initial=first)
    state, carry, sums = steps.train(state, carry, sums, batch, key, index)
    done = index + 1
    if done % ctx.log_every == 0 or done == task.steps_per_epoch:
      host = _host_sums(sums)
      live = task.summarize(host)
      where = f"training loss in epoch {epoch} by step {done}"
      check_finite(live, where, ctx.checkpoints, ctx.base_lr)
      bar.show(done, live, host["count"] - start_sums.get("count", 0.0))
    save, stop = ctx.stops.check((epoch - 1) * task.steps_per_epoch + done)
    if done == task.steps_per_epoch:
      save_at_end, stop_at_end = save, stop
    elif save:
      host = _host_sums(sums)
      check_finite(task.summarize(host), f"training loss in epoch {epoch}", ctx.checkpoints)
      seconds = before + time.perf_counter() - start
      if stop:
        bar.close()
      save_inside_epoch(ctx, run, state, carry, host, done, seconds)
      if stop:
        raise _preempted(ctx, f"at step {done} of {task.steps_per_epoch} of epoch {epoch}")
  if done != task.steps_per_epoch:
    raise ValueError(
      f"train_batches yielded fewer than steps_per_epoch={task.steps_per_epoch} batches"
    )
  jax.block_until_ready(state)
  seconds = before + (time.perf_counter() - start if start is not None else 0.0)
  host = _host_sums(sums) if sums is not None else dict(start_sums)
  if bar is not None:
    bar.close()
  return state, EpochTraining(host, seconds, save_at_end, stop_at_end)


def _start(first: int) -> dict[str, int]:
  # Tasks written before runs could stop inside an epoch take no ``start``; they start at 0 only.
  return {"start": first} if first else {}


def evaluate(
  steps: Steps, state: Any, task: Task, *, epoch: int = 0, final: bool = False
) -> tuple[dict[str, float], float]:
  """The task's end-of-epoch evaluation of ``state`` and its seconds."""
  start = time.perf_counter()
  evaluator = Evaluator(steps.eval, state, steps.shard, steps.num_devices, epoch=epoch, final=final)
  evaluation = task.evaluate(evaluator)
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
    f"{task.unit}_per_second": trained.sums["count"] / max(trained.seconds, 1e-9),
  }


def record_epoch(
  ctx: Context, run: RunState, state: Any, record: dict[str, Any], save: bool = False
) -> None:
  """Adds a finished epoch to ``run``: its history, a checkpoint (when due: every
  ``checkpoint_every`` epochs, after the last of this invocation, or when ``save``),
  metrics.jsonl, a printed line.

  A non-finite state array stops the run before anything of the epoch is written
  (:func:`check_finite_state`).
  """
  epoch = record["epoch"]
  check_finite_state(state, f"after epoch {epoch}", ctx.checkpoints, ctx.base_lr)
  run.state = state
  run.epoch = epoch
  run.step, run.carry, run.sums, run.seconds = 0, None, {}, 0.0
  run.history.append(record)
  config = ctx.config
  if save or due(epoch, config.checkpoint_every, settings.last_epoch(config)):
    meta = records.checkpoint_meta(run, ctx.task, config)
    with ctx.stops.saving():
      ctx.checkpoints.save(epoch * ctx.task.steps_per_epoch, (run.state, None), meta)
  if devices.is_primary():
    metrics.append_metrics(config.workdir, record)
  show_epoch(config.epochs, record)


def run_epochs(ctx: Context, run: RunState) -> None:
  """Trains, evaluates (when due) and records the epochs after ``run.epoch`` up to the last."""
  config, task = ctx.config, ctx.task
  for epoch in range(run.epoch + 1, settings.last_epoch(config) + 1):
    state, trained = train_epoch(ctx, run, epoch, epoch_key(run.root, epoch))
    if due(epoch, config.eval_every, config.epochs):
      final = epoch == config.epochs
      evaluation, eval_seconds = evaluate(ctx.steps, state, task, epoch=epoch, final=final)
      # A diverged model can train to a finite loss and still evaluate to NaN: a stop as well,
      # before the epoch is recorded or checkpointed.
      where = f"evaluation after epoch {epoch}"
      check_finite(evaluation, where, ctx.checkpoints, ctx.base_lr)
    else:
      evaluation, eval_seconds = {}, 0.0
    record = epoch_record(epoch, task, ctx.setup, trained, evaluation, eval_seconds)
    record_epoch(ctx, run, state, record, save=trained.save)
    if trained.stop and epoch < settings.last_epoch(config):
      raise _preempted(ctx, f"at the end of epoch {epoch}")


def train(task: Task, config: LoopConfig, *, log_every: int = 10) -> list[dict[str, Any]]:
  """Trains ``task`` as ``config`` says and returns the per-epoch records (also in metrics.jsonl).

  Args:
    task: the problem.
    config: the run's settings (a :class:`LoopConfig`, usually a task's subclass of it).
    log_every: steps between progress-bar updates and non-finite checks (each is a device sync).

  Returns:
    The run's history: one dict per epoch, from epoch 1 (restored epochs included on resume).

  Raises:
    NonFiniteLossError: when the training loss, an evaluation or the state becomes NaN or infinite.
    Preempted: when SIGTERM or SIGINT stopped the run (after saving a checkpoint).
    ValueError: for bad settings, a workdir holding another run (or in use by a live one), or a
      resume from a checkpoint made with other settings or data (or when none verifies).
  """
  config = records.check_run(config, task.registry_task)
  if config.dtype == "float16":
    devices.say(settings.FLOAT16_WARNING)
  mesh = devices.make_mesh(config.devices, config.mesh)
  _check_steps(task, config, mesh)
  records.check_same_data(config, task)
  setup = settings.make_optimizer(task, config)
  # Every process has checked the workdir before any of them changes it.
  records.check_same_on_every_process(config, task)
  workdir = pathlib.Path(config.workdir)
  with records.hold_workdir(workdir):
    records.remove_previous_run(config)
    root = jax.random.key(config.seed)
    model, state = make_state(task, setup.tx, root, mesh)
    steps = Steps(task, model, mesh)
    with Checkpoints(workdir / CHECKPOINTS_DIR) as checkpoints:

      def carry_like():
        return steps.shard(task.init_carry(config.batch_size))

      run = records.restore_or_start(checkpoints, state, root, task, config, carry_like)
      del state  # a restored run replaces it; from here on the run holds the state
      if run.epoch >= settings.last_epoch(config) and not run.step:
        devices.say(
          f"{workdir}: the run has finished (epoch {run.epoch} of {config.epochs}); nothing to do."
        )
        return run.history
      records.write_run_info(task, config, setup, model.num_params, mesh, run)
      records.clear_stopped(config)
      with Stops(config.checkpoint_every_minutes, sync_every=log_every) as stops:
        ctx = Context(task, config, setup, steps, checkpoints, stops, log_every)
        try:
          run_epochs(ctx, run)
        except NonFiniteLossError as e:
          records.write_stopped(config, run, str(e))
          raise
  return run.history


def _check_steps(task: Task, config: LoopConfig, mesh: jax.sharding.Mesh) -> None:
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
