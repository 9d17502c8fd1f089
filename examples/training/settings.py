"""A run's settings (:class:`LoopConfig`, which every trainer's config extends) and the checks that
need neither data nor a model: each bad option costs one line and no time."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax

from examples import cli, optimizers
from examples.training.devices import FSDP_AXIS, FSDP_MIN_SIZE, mesh_sizes, parse_mesh

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
    "checkpoint_every_minutes",
    "steps_per_call",
    "test_every",
  }
)
# Config fields that may change when a run resumes, each change recorded in run.json
# ("resumptions"); the learning rate's new base value applies with the same decay steps.
CHANGEABLE_ON_RESUME = frozenset({"learning_rate"})
# Config fields newer than some checkpoints, with the value the runs that wrote those had: a
# checkpoint without the field resumes as if it held that value.
ADDED_FIELDS = {"dtype": "float32", "state_bits": 32}
# The compute dtypes of ``--dtype``: activations and the operands of convolutions and matmuls.
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# ``--steps-per-call``'s default on an accelerator: a call runs the rest of the epoch, at most this
# many steps. One dispatch then costs the host a hundredth of what a step each did, while the
# progress bar, the non-finite check and a stop on a signal still come every 100 steps at the
# latest. On a CPU the default is 1 (see examples.training.epoch.steps_per_call).
DEFAULT_STEPS_PER_CALL = 100
FLOAT16_WARNING = (
  "warning: --dtype float16 has no loss scaling: gradients below float16's range (6e-8) become 0 "
  "and activations or gradients above 65504 become infinite (the run then stops); bfloat16 has "
  "float32's range"
)


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
  state_bits: int = cli.setting(
    32,
    choices=optimizers.STATE_BITS,
    help="bits per element of the optimizer state: 32 as the optimizer keeps it, 16 every moment "
    "in bfloat16 (rounded stochastically), 8 block-wise 8-bit codes (with_quantized_state)",
  )
  devices: int | None = cli.setting(
    None, help="number of devices to split the batch over (default: all)"
  )
  mesh: str | None = cli.setting(
    None,
    metavar="AXIS=N,...",
    help=f"device mesh, e.g. data=2,fsdp=4: every batch is split over all its devices; the "
    f"parameters and optimizer state of at least {FSDP_MIN_SIZE} elements are split over "
    "fsdp (FSDP), the rest replicated. The sizes multiply to the devices used (default: "
    "data=DEVICES, the state replicated)",
  )
  progress: bool = cli.setting(True, help="no progress bar (one line per epoch is still printed)")
  steps_per_call: int | None = cli.setting(
    None,
    metavar="K",
    help="train steps one call to the devices runs, each cutting its batch on the devices (the "
    "same results for any K). Default: 1 on a CPU (XLA:CPU runs convolutions inside a loop "
    f"slowly), else the rest of the epoch, at most {DEFAULT_STEPS_PER_CALL}. A task whose batches "
    "come from the host runs one step a call",
  )
  eval_every: int = cli.setting(
    1,
    help="evaluate every N epochs and after the last (the other epochs log training metrics only)",
  )
  test_every: int | None = cli.setting(
    None,
    help="evaluate the test set only every N epochs and after the last one (default: at every "
    "evaluation)",
  )
  checkpoint_every: int = cli.setting(
    1,
    help="checkpoint every N epochs and after the last one this invocation runs (a killed run "
    "resumes from the newest checkpoint, redoing at most N-1 epochs)",
  )
  checkpoint_every_minutes: float | None = cli.setting(
    None,
    metavar="M",
    help="also checkpoint inside an epoch once M minutes have passed since the last checkpoint "
    "(for epochs longer than a preemption notice)",
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
    cli.check_int("--test-every", self.test_every, minimum=1, optional=True)
    cli.check_int("--steps-per-call", self.steps_per_call, minimum=1, optional=True)
    cli.check_int("--checkpoint-every", self.checkpoint_every, minimum=1)
    if self.checkpoint_every_minutes is not None:
      cli.check_number("--checkpoint-every-minutes", self.checkpoint_every_minutes, positive=True)
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


def last_epoch(config: LoopConfig) -> int:
  """The epoch this invocation stops after: ``epochs``, or ``stop_after_epoch`` if earlier."""
  if config.stop_after_epoch is None:
    return config.epochs
  return min(config.epochs, config.stop_after_epoch)


def relative(path: str | os.PathLike | None) -> str | None:
  """``path`` relative to the current folder when it lies inside it, else its last name only:
  run.json records no path of the machine outside the folder the run was started from.

    >>> relative("runs/a"), relative("/elsewhere/data/ptb")
    ('runs/a', 'ptb')
  """
  if path is None:
    return None
  absolute, here = pathlib.Path(os.path.abspath(path)), pathlib.Path.cwd()
  return str(absolute.relative_to(here)) if absolute.is_relative_to(here) else absolute.name


def jsonable(config: LoopConfig) -> dict[str, Any]:
  """The config as JSON values, as run.json and the checkpoints record it (folders relative)."""
  values = json.loads(json.dumps(dataclasses.asdict(config), default=repr))
  for name in ("workdir", "data_dir"):
    if name in values:
      values[name] = relative(values[name])
  return values


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
      state_bits=config.state_bits,
      **dict(config.hparams),
    )
  except (TypeError, ValueError) as e:
    shown = " ".join(
      f"--hparam {k}={json.dumps(v, default=repr)}" for k, v in config.hparams.items()
    )
    if not shown:  # the message names the flag it rejects
      raise ValueError(str(e)) from e
    raise ValueError(f"{config.optimizer} rejects its hyperparameters ({shown}): {e}") from e


def check_workdir(config: LoopConfig, subfolder: str) -> None:
  """Raises ValueError unless ``--workdir`` (and its ``subfolder``, the checkpoints) is a folder
  this process can write to: it is created, and a probe file is written and removed in each."""
  workdir = pathlib.Path(config.workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"--workdir {workdir} is not valid; it is a file, not a folder")
  try:
    if not workdir.exists():
      workdir.mkdir(parents=True, exist_ok=True)
      cli.created_folders.append(workdir)
    for folder in (workdir, workdir / subfolder):
      if folder.exists():
        probe = folder / f".write-probe-{jax.process_index()}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
  except OSError as e:
    where = e.filename or workdir
    raise ValueError(
      f"--workdir {workdir} is not valid; cannot write to {where} ({e.strerror or e})"
    ) from e


def make_optimizer(task: Any, config: LoopConfig) -> optimizers.OptimizerSetup:
  """The registry's optimizer for ``task`` (its registry task, steps and size) with the overrides
  of ``config``."""
  return optimizers.make_optimizer(
    config.optimizer,
    task=task.registry_task,
    steps_per_epoch=task.steps_per_epoch,
    epochs=config.epochs,
    batch_size=config.batch_size,
    train_size=task.train_size,
    learning_rate=config.learning_rate,
    state_bits=config.state_bits,
    weight_decay_mask=task.weight_decay_mask,
    split_state=config.mesh is not None and parse_mesh(config.mesh).get(FSDP_AXIS, 1) > 1,
    **dict(config.hparams),
  )
