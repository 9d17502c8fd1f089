"""Running a protocol's runs: each through its example trainer, or as commands for a scheduler.

Every run trains in its own workdir (:func:`benchmarks.protocols.run_dir`, or
:func:`benchmarks.tuning.run_dir` for a tuned protocol). A finished run is skipped, an interrupted
one resumes from its last checkpoint, and the protocol's report is rewritten after each run.
:func:`commands` lists the trainer command lines of the runs that can start now instead.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks import protocols, tuning
from benchmarks.protocol_report import write_report
from benchmarks.protocols import RESULTS, Protocol, Variant, finished_epochs, run_dir
from examples import metrics

FIRST = ("padam", "sgdm", "adam", "amsgrad")


def _trainer(task: str):
  if task == "cifar10":
    from examples.cifar10 import train
  elif task == "ptb":
    from examples.ptb import train
  else:
    raise ValueError(f"unknown task {task!r}")
  return train


def _ended(workdir: pathlib.Path, epochs: int) -> str | None:
  """How the run in ``workdir`` ended ("finished", "stopped on a non-finite value"), or None when
  it has not (not started, or interrupted: it can resume)."""
  if metrics.read_stopped(workdir) is not None:
    return "stopped on a non-finite value"
  return "finished" if finished_epochs(workdir) >= epochs else None


def select_variants(protocol: Protocol, only: Sequence[str] = ()) -> list[Variant]:
  """The variants to run (those named by label or optimizer in ``only``, else all), in run order.

  The optimizers the paper's claims are about go first, so a grid cut short has them.

  Raises:
    ValueError: when ``only`` names no variant; the message lists the valid labels.
  """
  variants = [v for v in protocol.variants if not only or v.label in only or v.optimizer in only]
  variants.sort(key=lambda v: FIRST.index(v.optimizer) if v.optimizer in FIRST else len(FIRST))
  if only and not variants:
    valid = ", ".join(v.label for v in protocol.variants)
    raise ValueError(f"--only {list(only)} matches no run of {protocol.name}; valid: {valid}")
  return variants


def train_run(
  protocol: Protocol,
  variant: Variant,
  seed: int,
  *,
  data_dir: str | None = None,
  root: pathlib.Path = RESULTS,
  overrides: Mapping[str, Any] | None = None,
  progress: bool = True,
  workdir: pathlib.Path | None = None,
  learning_rate: float | None = None,
) -> bool:
  """Trains one run of ``protocol`` unless it is finished; resumes it if it was interrupted.

  A run that stops on a non-finite loss or state is reported, not raised: its ``stopped.json``
  records it, it counts as done, and the grid goes on.

  Args:
    protocol: the grid the run belongs to.
    variant: the run's line of the table.
    seed: the run's seed.
    data_dir: the dataset folder passed to the trainer.
    root: the results folder (the run's workdir is ``root/runs/SETTING/LABEL-seedS``).
    overrides: trainer config fields replacing the protocol's (e.g. ``stop_after_epoch``).
    progress: the trainer's progress bar.
    workdir: the run's folder when not :func:`run_dir`'s (a tuned protocol's).
    learning_rate: the base rate when not the registry's (a tuned protocol's).

  Returns:
    False when the run was already finished or stopped (and skipped), True when it trained.
  """
  from examples import training

  trainer = _trainer(protocol.task)
  config_fields = {**protocol.config, **variant.config, **(overrides or {})}
  workdir = run_dir(protocol, variant, seed, root) if workdir is None else workdir
  rate = "" if learning_rate is None else f" lr {learning_rate:.3g}"
  name = f"[{protocol.name}] {variant.label}{rate} seed {seed}"
  if (how := _ended(workdir, config_fields["epochs"])) is not None:
    print(f"{name}: {how}, skipped", flush=True)
    return False
  done = finished_epochs(workdir)
  print(f"{name}: {'resuming' if done else 'starting'} in {shown(workdir)}", flush=True)
  start = time.perf_counter()
  config = trainer.Config(
    **config_fields,
    optimizer=variant.optimizer,
    hparams=dict(variant.hparams),
    seed=seed,
    workdir=str(workdir),
    resume=True,
    data_dir=data_dir,
    progress=progress,
    learning_rate=learning_rate,
  )
  try:
    trainer.train_and_evaluate(config)
  except training.NonFiniteLossError as e:
    print(f"  stopped: {e}", flush=True)
  print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
  return True


def run_tuned(
  protocol: Protocol,
  *,
  seeds: int,
  only: Sequence[str] = (),
  data_dir: str | None = None,
  root: pathlib.Path = RESULTS,
  overrides: Mapping[str, Any] | None = None,
  progress: bool = True,
) -> None:
  """Runs a tuned protocol's grids and seeds (:func:`benchmarks.tuning.plan`) until none is left."""
  while jobs := tuning.plan(protocol, protocols.PROTOCOLS, root, seeds, only):
    job = jobs[0]
    print(f"[{protocol.name}] {len(jobs)} run(s) can start now", flush=True)
    train_run(
      protocol,
      job.variant,
      job.seed,
      data_dir=data_dir,
      root=root,
      overrides=overrides,
      progress=progress,
      workdir=job.workdir,
      learning_rate=job.learning_rate,
    )
    write_report(protocol, seeds=seeds, root=root)
  for line in waiting(protocol, root):
    print(f"[{protocol.name}] {line}", flush=True)


def shown(path: pathlib.Path) -> str:
  """``path`` relative to the working folder when it is inside it (as commands and logs show it)."""
  try:
    return str(path.resolve().relative_to(pathlib.Path.cwd()))
  except ValueError:
    return str(path)


def run_grid(
  protocol: Protocol,
  *,
  seeds: int,
  only: Sequence[str] = (),
  data_dir: str | None = None,
  root: pathlib.Path = RESULTS,
  overrides: Mapping[str, Any] | None = None,
  progress: bool = True,
) -> None:
  """Trains every (variant, seed) of ``protocol`` that is not finished, rewriting the report after each."""
  variants = select_variants(protocol, only)
  if protocol.tuning is not None:
    run_tuned(
      protocol,
      seeds=seeds,
      only=only,
      data_dir=data_dir,
      root=root,
      overrides=overrides,
      progress=progress,
    )
    return
  for seed in range(seeds):
    for variant in variants:
      trained = train_run(
        protocol,
        variant,
        seed,
        data_dir=data_dir,
        root=root,
        overrides=overrides,
        progress=progress,
      )
      if trained:
        write_report(protocol, seeds=seeds, root=root)


def _jobs(
  protocol: Protocol, seeds: int, only: Sequence[str], root: pathlib.Path
) -> list[tuple[Variant, int, pathlib.Path, float | None]]:
  """(variant, seed, workdir, learning rate or None) per run that can start now and is not
  finished.

  Raises:
    ValueError: when ``only`` names no variant (:func:`select_variants`).
  """
  variants = select_variants(protocol, only)
  if protocol.tuning is not None:
    return [
      (j.variant, j.seed, j.workdir, j.learning_rate)
      for j in tuning.plan(protocol, protocols.PROTOCOLS, root, seeds, only)
    ]
  return [
    (v, seed, run_dir(protocol, v, seed, root), None)
    for seed in range(seeds)
    for v in variants
    if _ended(run_dir(protocol, v, seed, root), protocol.config["epochs"]) is None
  ]


def waiting(protocol: Protocol, root: pathlib.Path = RESULTS) -> list[str]:
  """``"LABEL waits for ..."`` per variant of a tuned protocol that cannot run yet (its rate is
  chosen by another protocol's grid that has not finished)."""
  if protocol.tuning is None:
    return []
  return [
    f"{variant.label} {why}"
    for variant in protocol.variants
    if (why := tuning.grid(protocol, variant, protocols.PROTOCOLS, root).waiting)
  ]


def _python() -> str:
  """``python`` when that is the interpreter running this (an active virtual environment's, say),
  else that interpreter's path, so that a printed command runs where this one runs."""
  on_path = shutil.which("python")
  if on_path and os.path.abspath(on_path) == os.path.abspath(sys.executable):
    return "python"
  return sys.executable


def commands(
  protocol: Protocol,
  *,
  seeds: int,
  only: Sequence[str] = (),
  data_dir: str | None = None,
  root: pathlib.Path = RESULTS,
) -> list[str]:
  """One shell command per run that can start now and is not finished (each writes only its
  own folder); for a tuned protocol, rerun it as runs finish to get the next ones.

  On standard error, as ``#`` comments: why a variant waits, or, when no run is left, that every
  run is finished (a run stopped on a non-finite value counts as finished).

  Raises:
    ValueError: when ``only`` names no variant.
  """
  from examples import cli

  trainer = _trainer(protocol.task)
  module = f"examples.{protocol.task}"
  jobs = _jobs(protocol, seeds, only, root)
  waits = waiting(protocol, root)
  for line in waits:
    print(f"# {line}", file=sys.stderr)
  if not jobs and not waits:
    named = " named by --only" if only else ""
    print(f"# every run of {protocol.name}{named} is finished", file=sys.stderr)
  lines = []
  for variant, seed, workdir, rate in jobs:
    config = trainer.Config(
      **protocol.config,
      **variant.config,
      optimizer=variant.optimizer,
      hparams=dict(variant.hparams),
      seed=seed,
      workdir=shown(workdir),
      resume=True,
      learning_rate=rate,
      progress=False,
    )
    flags = cli.config_flags(config) + (["--data-dir", data_dir] if data_dir else [])
    lines.append(shlex.join([_python(), "-m", module, *flags]))
  return lines
