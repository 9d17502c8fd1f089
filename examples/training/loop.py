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

import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax

from examples import metrics, optimizers
from examples.training import devices, records, settings
from examples.training.checkpoints import CHECKPOINTS_DIR, Checkpoints
from examples.training.divergence import NonFiniteLossError, check_finite, check_finite_state
from examples.training.epoch import Context, EpochTraining, epoch_key, preempted, train_epoch
from examples.training.preemption import Stops
from examples.training.progress import show_epoch
from examples.training.records import RunState
from examples.training.settings import LoopConfig
from examples.training.steps import Steps, make_state
from examples.training.task import Evaluator, Task


def due(epoch: int, every: int, last: int) -> bool:
  """Whether something done every ``every`` epochs and after epoch ``last`` is due after ``epoch``."""
  return epoch % every == 0 or epoch == last


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
      check_finite(evaluation, where, ctx.checkpoints, ctx.base_lr, task.chance_loss)
    else:
      evaluation, eval_seconds = {}, 0.0
    record = epoch_record(epoch, task, ctx.setup, trained, evaluation, eval_seconds)
    record_epoch(ctx, run, state, record, save=trained.save)
    if trained.stop and epoch < settings.last_epoch(config):
      raise preempted(ctx, f"at the end of epoch {epoch}")


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
      data = task.train_data()
      if data is not None:
        data = steps.place_data(data)
      minutes = config.checkpoint_every_minutes
      with Stops(minutes, sync_every=log_every, every_call=data is not None) as stops:
        ctx = Context(task, config, setup, steps, checkpoints, stops, log_every, data)
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
