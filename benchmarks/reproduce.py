"""Reproduce the paper's comparisons: a grid of runs, then its table and figures.

    python -m benchmarks.reproduce PROTOCOL [--data-dir DIR] [--seeds N] [--only NAME ...]
    python -m benchmarks.reproduce PROTOCOL --report-only   # tables and figures from metrics only
    python -m benchmarks.reproduce PROTOCOL --results DIR   # runs and reports under DIR instead
    python -m benchmarks.reproduce PROTOCOL --commands      # one trainer command per run, for a scheduler
    python -m benchmarks.reproduce --list

Every run of a protocol (task x optimizer x seed) trains through the example trainers
(``examples.cifar10`` / ``examples.ptb``) in its own workdir,
``benchmarks/results/runs/SETTING/LABEL-seedS/``, so that protocols sharing a setting (the
optimizer comparison and the p sweep on CIFAR-10) share the identical runs. A finished run is
skipped, an interrupted one resumes from its last checkpoint: the command can be killed and
re-run at any time. After each run, ``benchmarks/results/PROTOCOL/`` is rewritten from the
metrics files alone: ``table.md`` (the paper's Table 1/3 layout) and the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks import stats
from benchmarks import tuning as tuning_
from examples import metrics
from examples.optimizers import PAPER_OPTIMIZERS

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
FIRST = ("padam", "sgdm", "adam", "amsgrad")


def _paper(*values: float) -> dict[str, float]:
  """The paper's numbers for its optimizers, in the registry's order (sgdm, adam, ..., padam)."""
  return dict(zip(PAPER_OPTIMIZERS, values, strict=True))


# The paper's final-epoch numbers (its Tables 1 and 3), by model and optimizer.
PAPER_CIFAR10_ACC = {
  "vgg16": _paper(93.71, 92.21, 92.54, 93.54, 92.94, 93.28, 93.78),
  "resnet18": _paper(95.00, 92.89, 93.53, 94.56, 93.92, 94.16, 94.94),
  "wrn16_4": _paper(95.26, 92.27, 92.91, 95.08, 94.23, 93.85, 95.34),
}
PAPER_PTB_PPL = {
  "lstm2": _paper(63.37, 61.58, 62.56, 63.93, 64.13, 63.14, 61.53),
  "lstm3": _paper(61.22, 60.44, 61.92, 63.24, 60.01, 60.89, 58.48),
}


@dataclasses.dataclass(frozen=True)
class Variant:
  """One line of a table: an optimizer from the registry, with optional overrides."""

  label: str
  optimizer: str
  hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  run: str | None = (
    None  # the run folder's name when it is not the label's (a run shared by protocols)
  )
  base_lr: float | None = None  # a tuned protocol's x1 rate, when not the registry's
  rate_of: tuple[str, str] | None = None  # (protocol, label): use the rate chosen there, no grid


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A grid of runs and how to report it.

  Attributes:
    name: the protocol's name (the folder of its report).
    task: ``"cifar10"`` or ``"ptb"``.
    setting: the name of the shared run folder; protocols with the same setting share runs.
    config: the trainer's config fields common to every run (model, epochs, sizes, ...).
    variants: the table's lines.
    seeds: how many seeds (0, 1, ...) by default.
    paper: the paper's number per optimizer for the same cell, and what that cell is.
    figure: ``"curves"`` (the paper's Figure 2) or ``"psweep"`` (its Figure 1).
    about: why this design, printed at the top of the table.
    tuning: for a tuned protocol, how each variant's learning rate is chosen (see
      :mod:`benchmarks.tuning`); None: the registry's rates.
    compare: pairs of labels whose paired test-accuracy difference a tuned protocol reports.
  """

  name: str
  task: str
  setting: str
  config: Mapping[str, Any]
  variants: tuple[Variant, ...]
  seeds: int = 1
  paper: tuple[str, Mapping[str, float]] | None = None
  figure: str = "curves"
  about: str = ""
  tuning: tuning_.Tuning | None = None
  compare: tuple[tuple[str, str], ...] = ()

  @property
  def registry_task(self) -> str:
    """The optimizer registry's task (its hyperparameters) for this protocol's runs."""
    if self.task == "cifar10":
      return "cifar10"
    return "ptb3" if str(self.config.get("model", "")).startswith("lstm3") else "ptb2"


def _seven() -> tuple[Variant, ...]:
  """The paper's optimizers, each with the registry's hyperparameters."""
  return tuple(Variant(name, name) for name in PAPER_OPTIMIZERS)


_P_SWEEP = (
  Variant("padam p=1/2", "padam", {"p": 0.5}),
  Variant("padam p=1/4", "padam", {"p": 0.25}),
  Variant("padam p=1/8", "padam", run="padam"),  # the registry's default: cifar10-mini's run
  Variant("padam p=1/16", "padam", {"p": 0.0625}),
  Variant("sgdm", "sgdm"),  # p -> 0
)

_CIFAR10_MINI = dict(
  model="resnet8", train_size=1000, test_size=1000, batch_size=32, epochs=240, eval_batch_size=1000
)
_CIFAR10_MINI_ABOUT = (
  "ResNet-8 (widths 16/32/64, 75k parameters) on a class-balanced 1,000-image subset of the "
  "CIFAR-10 training set with the reference augmentation, tested on a class-balanced 1,000 "
  "test images after every epoch; batch 32 "
  "(31 steps an epoch), 240 epochs = 7,440 steps, learning rate x0.1 after epochs 120 and 180; "
  "the paper's hyperparameters from the registry. Why: the paper's effects live where the "
  "training loss approaches zero and the decays decide generalization; on 2 CPU cores that "
  "needs thousands of cheap steps on a set small enough to be fitted (the measured pilots "
  "stopped at train loss 0.6-1.0 after 600-2,500 steps); measured 515-706 s a run on the 2-core "
  "CPU, so the 7 optimizers take ~65 minutes a seed. A seed draws the model's initialization, "
  "the augmentation and the batch order, and also the 1,000-image training and test subsets, so "
  "the spread over seeds includes the choice of subset."
)

_CIFAR10_TUNED = dict(
  model="resnet8",
  train_size=1000,
  val_size=1000,
  batch_size=32,
  epochs=240,
  eval_batch_size=1000,
  eval_every=4,
  test_every=240,
  checkpoint_every=4,
)
_CIFAR10_TUNED_ABOUT = (
  "ResNet-8 on 1,000 class-balanced CIFAR-10 training images, as cifar10-mini (batch 32, 240 "
  "epochs, x0.1 after epochs 120 and 180, the registry's other hyperparameters), but the learning "
  "rate is tuned: a class-balanced validation split of 1,000 further training images (disjoint "
  "from the 1,000) is evaluated every 4 epochs and after the last, and each optimizer's rate is "
  "chosen among x1/3, x1 and x3 of its base rate by the final validation accuracy of seed 0 (the "
  "grid grows by x3 past an edge that holds the best, up to x1/27 or x27); seeds 1 and 2 then run "
  "at the chosen rate. The full 10,000-image test set is evaluated once, after the last epoch, "
  "and nothing is chosen by it. A seed draws the initialization, augmentation, batch order, and "
  "the training and validation subsets. Evaluating and checkpointing every 4 epochs instead of "
  "every epoch saves time and changes no trained number."
)
# Padam's x1 rate per p: log-linear in p between the paper's two anchors, Padam's 0.1 at p = 1/8
# and AMSGrad's 1e-3 at p = 1/2 (the step lr / vhat^p scales like vhat^-p).
_P_RATES = {0.5: 1e-3, 0.25: 0.1 * 0.01 ** (1 / 3), 0.0625: 0.1 * 0.01 ** (-1 / 6)}
_TUNED_GRID = tuning_.Tuning(reach=3)


def _tuned_four() -> tuple[Variant, ...]:
  return tuple(Variant(name, name) for name in ("sgdm", "adam", "amsgrad", "padam"))


def _gap_variants() -> tuple[Variant, ...]:
  rate = ("cifar10-tuned", "padam")
  return (
    Variant("padam", "padam", rate_of=rate),
    Variant("sgdm", "sgdm", rate_of=("cifar10-tuned", "sgdm")),
    Variant("padamw", "padamw", {"weight_decay_normalized": 0.025}, rate_of=rate),
    Variant("padam wd x2", "padam", {"weight_decay": 1e-3}, rate_of=rate),
    Variant("padam wd x1/2", "padam", {"weight_decay": 2.5e-4}, rate_of=rate),
    Variant("padam no bias correction", "padam", {"bias_correction": False}, rate_of=rate),
    Variant("padam p annealed", "padam_annealed", rate_of=rate),
  )


PROTOCOLS: dict[str, Protocol] = {
  p.name: p
  for p in (
    Protocol(
      name="cifar10-mini",
      task="cifar10",
      setting="cifar10-mini",
      config=_CIFAR10_MINI,
      variants=_seven(),
      seeds=2,
      paper=("paper: ResNet-18, full CIFAR-10, 200 epochs", PAPER_CIFAR10_ACC["resnet18"]),
      about=_CIFAR10_MINI_ABOUT,
    ),
    Protocol(
      name="psweep-mini",
      task="cifar10",
      setting="cifar10-mini",
      config=_CIFAR10_MINI,
      variants=_P_SWEEP,
      figure="psweep",
      about="Padam's p on the cifar10-mini setting (the paper's Figure 1). " + _CIFAR10_MINI_ABOUT,
    ),
    Protocol(
      name="cifar10-tuned",
      task="cifar10",
      setting="cifar10-tuned",
      config=_CIFAR10_TUNED,
      variants=_tuned_four(),
      tuning=_TUNED_GRID,
      compare=(
        ("padam", "sgdm"),
        ("adam", "sgdm"),
        ("amsgrad", "sgdm"),
        ("padam", "adam"),
        ("padam", "amsgrad"),
      ),
      about=_CIFAR10_TUNED_ABOUT,
    ),
    Protocol(
      name="psweep-tuned",
      task="cifar10",
      setting="cifar10-tuned",
      config=_CIFAR10_TUNED,
      variants=(
        Variant("padam p=1/2", "padam", {"p": 0.5}, base_lr=_P_RATES[0.5]),
        Variant("padam p=1/4", "padam", {"p": 0.25}, base_lr=_P_RATES[0.25]),
        Variant("padam p=1/8", "padam", run="padam"),  # cifar10-tuned's runs
        Variant("padam p=1/16", "padam", {"p": 0.0625}, base_lr=_P_RATES[0.0625]),
        Variant("sgdm", "sgdm"),  # p -> 0; cifar10-tuned's runs
      ),
      tuning=dataclasses.replace(_TUNED_GRID, seeds=1),
      figure="psweep",
      about="Padam's p with the learning rate tuned per p, on the cifar10-tuned setting: each p's "
      "grid is centred on a rate log-linear in p between the paper's Padam (0.1 at p = 1/8) and "
      "AMSGrad (1e-3 at p = 1/2): 1e-3 at p = 1/2, 0.0215 at 1/4, 0.215 at 1/16. One seed by "
      "default (the grid's); p = 1/8 and SGD-M share cifar10-tuned's runs. " + _CIFAR10_TUNED_ABOUT,
    ),
    Protocol(
      name="padam-gap",
      task="cifar10",
      setting="cifar10-tuned",
      config=_CIFAR10_TUNED,
      variants=_gap_variants(),
      seeds=2,
      tuning=dataclasses.replace(_TUNED_GRID, seeds=2),
      compare=(
        ("padamw", "padam"),
        ("padam wd x2", "padam"),
        ("padam wd x1/2", "padam"),
        ("padam no bias correction", "padam"),
        ("padam p annealed", "padam"),
        ("padam", "sgdm"),
        ("padamw", "sgdm"),
        ("padam wd x2", "sgdm"),
        ("padam wd x1/2", "sgdm"),
        ("padam no bias correction", "sgdm"),
        ("padam p annealed", "sgdm"),
      ),
      about="What closes Padam's gap to SGD-M: at the rate cifar10-tuned chose for Padam, one "
      "change at a time, 2 seeds each (seeds 0 and 1, paired with Padam's and SGD-M's "
      "cifar10-tuned runs of the same seeds): decoupled weight decay (padamw, normalized as the "
      "registry's AdamW: 0.025 sqrt(batch / (train size x epochs)) per step, following the "
      "schedule), coupled L2 x2 (1e-3) and x1/2 (2.5e-4), no bias correction (the reference "
      "applies Adam's), and p annealed linearly from 1/2 to 1/8 over the first quarter of the "
      "steps while the rate rises log-linearly from 1/100 of the chosen rate to it (padam_annealed). "
      + _CIFAR10_TUNED_ABOUT,
    ),
    Protocol(
      name="ptb-mini",
      task="ptb",
      setting="ptb-mini",
      config=dict(model="lstm2-small", epochs=4, batch_size=20, train_tokens=300_000),
      variants=_seven(),
      paper=("paper: 2-layer LSTM (size not given), 200 epochs", PAPER_PTB_PPL["lstm2"]),
      about=(
        "lstm2-small (2x200) on the first 300,000 training tokens of PTB, 4 epochs, batch "
        "20, learning rate x0.1 after epochs 2 and 3, the paper's ptb2 hyperparameters from "
        "the registry; full validation and test streams. Why: at ~3,500 training tokens/s "
        "on the 2-core CPU, 60 minutes for seven optimizers is ~1.2M tokens each, 1.3 "
        "passes over PTB's 929k; a 300k-token prefix seen 4 times keeps the paper's two "
        "decays and a per-epoch curve (measured 328-378 s a run, 42 minutes in all). It "
        "compares early training, far from the paper's converged perplexities."
      ),
    ),
    Protocol(
      name="gpu-short",
      task="cifar10",
      setting="gpu-short",
      config=dict(model="resnet18", epochs=8, batch_size=128, eval_batch_size=2000),
      variants=_seven(),
      paper=("paper: ResNet-18, 200 epochs", PAPER_CIFAR10_ACC["resnet18"]),
      about="ResNet-18 on full CIFAR-10, 8 epochs per optimizer: sized for ~10 minutes on one H200.",
    ),
    Protocol(
      name="gpu-short-tiny",
      task="cifar10",
      setting="gpu-short-tiny",
      config=dict(
        model="resnet8_w0.5",
        epochs=2,
        batch_size=32,
        train_size=256,
        test_size=200,
        eval_batch_size=200,
      ),
      variants=tuple(Variant(name, name) for name in ("padam", "sgdm")),
      about="A rehearsal of gpu-short on a CPU (`python -m benchmarks.accelerator --tiny`): "
      "ResNet-8 at half width on 256 training and 200 test images, 2 epochs, Padam and SGD-M. "
      "It checks the pipeline, not the optimizers.",
    ),
    *(
      Protocol(
        name=f"paper-cifar10-{model}",
        task="cifar10",
        setting=f"paper-cifar10-{model}",
        config=dict(model=model, epochs=200, batch_size=128),
        variants=_seven(),
        paper=(f"paper: {model}", PAPER_CIFAR10_ACC[model]),
        about="The paper's exact CIFAR-10 configuration (its Section 5), for GPU/TPU.",
      )
      for model in PAPER_CIFAR10_ACC
    ),
    *(
      Protocol(
        name=f"paper-ptb-{model}",
        task="ptb",
        setting=f"paper-ptb-{model}",
        config=dict(model=model, epochs=200, batch_size=20),
        variants=_seven(),
        paper=(f"paper: {model}", PAPER_PTB_PPL[model]),
        about="The paper's PTB configuration (its Section 5; LSTM sizes are this project's "
        "choice).",
      )
      for model in PAPER_PTB_PPL
    ),
  )
}


def _slug(label: str) -> str:
  return label.replace(" ", "-").replace("/", "_").replace("=", "")


def run_dir(
  protocol: Protocol, variant: Variant, seed: int, root: pathlib.Path = RESULTS
) -> pathlib.Path:
  return root / "runs" / protocol.setting / f"{_slug(variant.run or variant.label)}-seed{seed}"


def _trainer(task: str):
  if task == "cifar10":
    from examples.cifar10 import train
  elif task == "ptb":
    from examples.ptb import train
  else:
    raise ValueError(f"unknown task {task!r}")
  return train


def _finished_epochs(workdir: pathlib.Path) -> int:
  try:
    return len(metrics.read_metrics(workdir))
  except FileNotFoundError:
    return 0


def _ended(workdir: pathlib.Path, epochs: int) -> str | None:
  """How the run in ``workdir`` ended ("finished", "stopped on a non-finite value"), or None when
  it has not (not started, or interrupted: it can resume)."""
  if metrics.read_stopped(workdir) is not None:
    return "stopped on a non-finite value"
  return "finished" if _finished_epochs(workdir) >= epochs else None


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
  config_fields = {**protocol.config, **(overrides or {})}
  workdir = run_dir(protocol, variant, seed, root) if workdir is None else workdir
  rate = "" if learning_rate is None else f" lr {learning_rate:.3g}"
  name = f"[{protocol.name}] {variant.label}{rate} seed {seed}"
  if (how := _ended(workdir, config_fields["epochs"])) is not None:
    print(f"{name}: {how}, skipped", flush=True)
    return False
  done = _finished_epochs(workdir)
  print(f"{name}: {'resuming' if done else 'starting'} in {_shown(workdir)}", flush=True)
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
  while jobs := tuning_.plan(protocol, PROTOCOLS, root, seeds, only):
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
  for variant in protocol.variants:
    if waiting := tuning_.grid(protocol, variant, PROTOCOLS, root).waiting:
      print(f"[{protocol.name}] {variant.label} {waiting}", flush=True)


def _shown(path: pathlib.Path) -> str:
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
  variants = select_variants(protocol, only)
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


# ---- the report: from the metrics files only ----


def _collect(
  protocol: Protocol, seeds: int, root: pathlib.Path
) -> dict[str, list[list[dict[str, Any]]]]:
  """label -> list (one per seed that has any epoch) of per-epoch records."""
  runs: dict[str, list[list[dict[str, Any]]]] = {}
  for variant in protocol.variants:
    for seed in range(seeds):
      workdir = run_dir(protocol, variant, seed, root)
      if _finished_epochs(workdir):
        runs.setdefault(variant.label, []).append(metrics.read_metrics(workdir))
  return runs


def _metric(protocol: Protocol) -> tuple[str, str, bool, float]:
  """(record key, column name, higher is better, display scale)."""
  if protocol.task == "cifar10":
    return "test_acc", "test accuracy %", True, 100.0
  return "test_ppl", "test perplexity", False, 1.0


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of a results table, as numbers.

  Attributes:
    variant: the line's variant.
    seeds: the finished runs (seeds) it averages; 0 when none finished.
    status: for no finished run: ``"not run"`` or how far the furthest run got; else ``""``.
    final, early: the metric (display scale) at the last epoch and at a quarter of the epochs.
    final_loss, early_loss: the train loss at the same epochs.
    paper: the paper's number for the optimizer (None for a modified one or none given).
  """

  variant: Variant
  seeds: int
  status: str = ""
  final: stats.Stat | None = None
  early: stats.Stat | None = None
  final_loss: stats.Stat | None = None
  early_loss: stats.Stat | None = None
  paper: float | None = None


@dataclasses.dataclass(frozen=True)
class Table:
  """A protocol's results, as numbers: :func:`results_table` computes it, :func:`render` writes it.

  Attributes:
    metric: the column name of the metric (e.g. ``"test accuracy %"``).
    early_epoch: the early epoch of the table (a quarter of the epochs, at least 1).
    paper_title: the heading of the paper's column, or None when there is none.
    rows: one per variant, in the protocol's order.
    best: the label of the best final mean, or None.
  """

  metric: str
  early_epoch: int
  paper_title: str | None
  rows: tuple[Row, ...]
  best: str | None


def _row(variant: Variant, runs: Sequence[list[dict[str, Any]]], protocol: Protocol) -> Row:
  key, _, _, scale = _metric(protocol)
  epochs = protocol.config["epochs"]
  early = max(1, epochs // 4)
  paper = None
  if protocol.paper and not variant.hparams:
    paper = protocol.paper[1].get(variant.optimizer)
  histories = [h for h in runs if len(h) >= epochs]
  if not histories:
    partial = [len(h) for h in runs if len(h) < epochs]
    status = f"running or interrupted ({max(partial)}/{epochs} epochs)" if partial else "not run"
    return Row(variant, 0, status=status, paper=paper)
  return Row(
    variant,
    len(histories),
    final=stats.Stat.of([scale * h[epochs - 1][key] for h in histories]),
    early=stats.Stat.of([scale * h[early - 1][key] for h in histories]),
    final_loss=stats.Stat.of([h[epochs - 1]["train_loss"] for h in histories]),
    early_loss=stats.Stat.of([h[early - 1]["train_loss"] for h in histories]),
    paper=paper,
  )


def results_table(protocol: Protocol, seeds: int, root: pathlib.Path = RESULTS) -> Table:
  """The protocol's results from its runs' metrics files, as numbers."""
  _, name, higher, _ = _metric(protocol)
  runs = _collect(protocol, seeds, root)
  rows = tuple(_row(v, runs.get(v.label, []), protocol) for v in protocol.variants)
  finished = [row for row in rows if row.final is not None]
  best = None
  if finished:
    pick = max if higher else min
    best = pick(finished, key=lambda row: row.final.mean).variant.label
  return Table(
    metric=name,
    early_epoch=max(1, protocol.config["epochs"] // 4),
    paper_title=protocol.paper[0] if protocol.paper else None,
    rows=rows,
    best=best,
  )


def _cells(row: Row, best: str | None) -> list[str]:
  if row.final is None:
    return [row.variant.label, row.status, "", "", "", "0"]
  final = row.final.format()
  return [
    row.variant.label,
    f"**{final}**" if row.variant.label == best else final,
    row.early.format(),
    row.final_loss.format(3),
    row.early_loss.format(3),
    str(row.seeds),
  ]


def render(table: Table) -> str:
  """The table in markdown, the paper's Table 1/3 layout: mean ± deviation, the best in bold."""
  early = table.early_epoch
  header = [
    "optimizer",
    f"final {table.metric}",
    f"{table.metric}, epoch {early}",
    "final train loss",
    f"train loss, epoch {early}",
    "seeds",
  ]
  if table.paper_title:
    header.append(table.paper_title)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in table.rows:
    cells = _cells(row, table.best)
    if table.paper_title:
      cells.append("" if row.paper is None else f"{row.paper:.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def table(protocol: Protocol, seeds: int, root: pathlib.Path = RESULTS) -> str:
  """The protocol's results table (markdown) from its runs' metrics files."""
  return render(results_table(protocol, seeds, root))


def write_report(protocol: Protocol, *, seeds: int, root: pathlib.Path = RESULTS) -> pathlib.Path:
  """Writes ``root/PROTOCOL/table.md`` and the figures; returns the folder."""
  from examples import plot

  out = root / protocol.name
  out.mkdir(parents=True, exist_ok=True)
  default_seeds = protocol.tuning.seeds if protocol.tuning else protocol.seeds
  command = f"python -m benchmarks.reproduce {protocol.name}" + (
    f" --seeds {seeds}" if seeds != default_seeds else ""
  )
  runs = f"benchmarks/results/runs/{protocol.setting}/"
  if pathlib.Path(root).resolve() != RESULTS:  # another results folder: name it by its runs only
    command += " --results DIR"
    runs = f"DIR/runs/{protocol.setting}/, DIR being the folder above this one"
  if protocol.tuning is not None:
    return _write_tuned_report(protocol, out, command, runs, seeds, root, plot)
  text = (
    f"# {protocol.name}\n\n{protocol.about}\n\nMade by `{command}`; regenerate the tables and "
    f"figures from the committed metrics with `{command} --report-only`. Mean ± standard "
    f"deviation over seeds where there is more than one; best final value in bold. Runs: "
    f"`{runs}`.\n\n{table(protocol, seeds, root)}"
  )
  (out / "table.md").write_text(text)
  workdirs, labels = [], []  # one line per variant: the mean over its seeds, their range shaded
  for variant in protocol.variants:
    group = [
      str(w)
      for seed in range(seeds)
      if _finished_epochs(w := run_dir(protocol, variant, seed, root))
    ]
    if group:
      workdirs.append(group)
      labels.append(variant.label)
  if workdirs:
    name = "figure1_p_sweep.png" if protocol.figure == "psweep" else "figure2_curves.png"
    plot.plot(
      workdirs, str(out / name), labels, title=f"{protocol.name}: {protocol.config.get('model')}"
    )
  return out


def _write_tuned_report(
  protocol: Protocol,
  out: pathlib.Path,
  command: str,
  runs: str,
  seeds: int,
  root: pathlib.Path,
  plot: Any,
) -> pathlib.Path:
  text = (
    f"# {protocol.name}\n\n{protocol.about}\n\nMade by `{command}`; regenerate the tables and "
    f"figures from the committed metrics with `{command} --report-only`. Mean ± standard "
    f"deviation over seeds; a difference is paired by seed, with a 95% t-interval over the "
    f"seeds. Runs: `{runs}`.\n\n" + tuning_.report(protocol, PROTOCOLS, root, seeds)
  )
  (out / "table.md").write_text(text)
  groups = tuning_.chosen_workdirs(protocol, PROTOCOLS, root, seeds)
  if groups:
    name = "figure1_p_sweep.png" if protocol.figure == "psweep" else "figure2_curves.png"
    plot.plot(
      [folders for _, folders in groups],
      str(out / name),
      [label for label, _ in groups],
      title=f"{protocol.name}: {protocol.config.get('model')}, each at its chosen learning rate",
    )
  if series := tuning_.grid_points(protocol, PROTOCOLS, root):
    select = protocol.tuning.select
    plot.plot_rates(
      [
        (label, [(rate, 100 * score) for rate, score in points], chosen)
        for label, points, chosen in series
      ],
      str(out / "learning_rate_grid.png"),
      f"final {select} % (seed 0)",
      title=f"{protocol.name}: {protocol.config.get('model')}, the learning-rate grid (chosen ringed)",
    )
  return out


def commands(
  protocol: Protocol,
  *,
  seeds: int,
  only: Sequence[str] = (),
  data_dir: str | None = None,
  root: pathlib.Path = RESULTS,
) -> list[str]:
  """One shell command per run that can start now and is not finished (each writes only its
  own folder); for a tuned protocol, rerun it as runs finish to get the next ones."""
  from examples import cli

  trainer = _trainer(protocol.task)
  module = f"examples.{protocol.task}"
  if protocol.tuning is not None:
    jobs = [
      (j.variant, j.seed, j.workdir, j.learning_rate)
      for j in tuning_.plan(protocol, PROTOCOLS, root, seeds, only)
    ]
  else:
    jobs = [
      (v, seed, run_dir(protocol, v, seed, root), None)
      for seed in range(seeds)
      for v in select_variants(protocol, only)
      if _ended(run_dir(protocol, v, seed, root), protocol.config["epochs"]) is None
    ]
  for variant in protocol.variants if protocol.tuning is not None else ():
    if waiting := tuning_.grid(protocol, variant, PROTOCOLS, root).waiting:
      print(f"# {variant.label} {waiting}", file=sys.stderr)
  lines = []
  for variant, seed, workdir, rate in jobs:
    config = trainer.Config(
      **protocol.config,
      optimizer=variant.optimizer,
      hparams=dict(variant.hparams),
      seed=seed,
      workdir=_shown(workdir),
      resume=True,
      learning_rate=rate,
      progress=False,
    )
    flags = cli.config_flags(config) + (["--data-dir", data_dir] if data_dir else [])
    lines.append(shlex.join(["python", "-m", module, *flags]))
  return lines


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "protocol",
    nargs="?",
    choices=sorted(PROTOCOLS),
    metavar="PROTOCOL",
    help=f"one of: {', '.join(PROTOCOLS)}",
  )
  parser.add_argument("--list", action="store_true", help="list the protocols and exit")
  parser.add_argument(
    "--seeds", type=int, default=None, help="seeds 0..N-1 (default: the protocol's)"
  )
  parser.add_argument("--only", nargs="*", default=(), help="only these optimizers / labels")
  parser.add_argument("--data-dir", default=None, help="dataset folder (default: $PADAM_DATA_DIR)")
  parser.add_argument("--report-only", action="store_true", help="only rewrite table and figures")
  parser.add_argument(
    "--results",
    type=pathlib.Path,
    default=RESULTS,
    metavar="DIR",
    help="results folder: runs in DIR/runs/SETTING/, reports in DIR/PROTOCOL/ (default: "
    "benchmarks/results)",
  )
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  parser.add_argument(
    "--commands",
    action="store_true",
    help="print one shell command per run that can start now (for a scheduler) and exit",
  )
  args = parser.parse_args(argv)
  if args.list or args.protocol is None:
    for p in PROTOCOLS.values():
      print(
        f"{p.name:24s} {p.task:8s} {len(p.variants)} variants x {p.seeds} seed(s): {p.about[:80]}"
      )
    return 0
  protocol = PROTOCOLS[args.protocol]
  default_seeds = protocol.tuning.seeds if protocol.tuning else protocol.seeds
  seeds = default_seeds if args.seeds is None else args.seeds
  if seeds < 1:
    parser.error(f"--seeds must be >= 1, got {seeds}")
  if args.commands:
    lines = commands(
      protocol, seeds=seeds, only=args.only, data_dir=args.data_dir, root=args.results
    )
    print("\n".join(lines))
    return 0
  if not args.report_only:
    from examples import cli

    cli.configure_xla([])
    try:
      run_grid(
        protocol,
        seeds=seeds,
        only=args.only,
        data_dir=args.data_dir,
        root=args.results,
        progress=not args.no_progress,
      )
    except (ValueError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  out = write_report(protocol, seeds=seeds, root=args.results)
  print((out / "table.md").read_text())
  return 0


if __name__ == "__main__":
  sys.exit(main())
