"""Reproduce the paper's comparisons: a grid of runs, then its table and figures.

    python -m benchmarks.reproduce PROTOCOL [--data-dir DIR] [--seeds N] [--only NAME ...]
    python -m benchmarks.reproduce PROTOCOL --report-only   # tables and figures from metrics only
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
import math
import pathlib
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from examples import metrics

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PAPER_SEVEN = ("sgdm", "adam", "amsgrad", "adamw", "yogi", "adabound", "padam")
FIRST = ("padam", "sgdm", "adam", "amsgrad")

# The paper's final-epoch numbers (REFERENCE.md §2), by model and optimizer.
PAPER_CIFAR10_ACC = {
    "vgg16": dict(zip(PAPER_SEVEN, (93.71, 92.21, 92.54, 93.54, 92.94, 93.28, 93.78), strict=True)),
    "resnet18": dict(zip(PAPER_SEVEN, (95.00, 92.89, 93.53, 94.56, 93.92, 94.16, 94.94), strict=True)),
    "wrn16_4": dict(zip(PAPER_SEVEN, (95.26, 92.27, 92.91, 95.08, 94.23, 93.85, 95.34), strict=True)),
}
PAPER_PTB_PPL = {
    "lstm2": dict(zip(PAPER_SEVEN, (63.37, 61.58, 62.56, 63.93, 64.13, 63.14, 61.53), strict=True)),
    "lstm3": dict(zip(PAPER_SEVEN, (61.22, 60.44, 61.92, 63.24, 60.01, 60.89, 58.48), strict=True)),
}


@dataclasses.dataclass(frozen=True)
class Variant:
  """One line of a table: an optimizer from the registry, with optional overrides."""

  label: str
  optimizer: str
  hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  run: str | None = None  # the run folder's name when it is not the label's (a run shared by protocols)


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


def _seven() -> tuple[Variant, ...]:
  return tuple(Variant(name, name) for name in PAPER_SEVEN)


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

PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "cifar10-mini", "cifar10", "cifar10-mini", _CIFAR10_MINI, _seven(), seeds=2,
            paper=("paper: ResNet-18, full CIFAR-10, 200 epochs", PAPER_CIFAR10_ACC["resnet18"]),
            about=_CIFAR10_MINI_ABOUT,
        ),
        Protocol(
            "psweep-mini", "cifar10", "cifar10-mini", _CIFAR10_MINI, _P_SWEEP, figure="psweep",
            about="Padam's p on the cifar10-mini setting (the paper's Figure 1). " + _CIFAR10_MINI_ABOUT,
        ),
        Protocol(
            "ptb-mini", "ptb", "ptb-mini",
            dict(model="lstm2-small", epochs=4, batch_size=20, train_tokens=300_000),
            _seven(),
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
            "gpu-short", "cifar10", "gpu-short",
            dict(model="resnet18", epochs=8, batch_size=128, eval_batch_size=2000),
            _seven(),
            paper=("paper: ResNet-18, 200 epochs", PAPER_CIFAR10_ACC["resnet18"]),
            about="ResNet-18 on full CIFAR-10, 8 epochs per optimizer: sized for ~10 minutes on one H200.",
        ),
        *(
            Protocol(
                f"paper-cifar10-{model}", "cifar10", f"paper-cifar10-{model}",
                dict(model=model, epochs=200, batch_size=128), _seven(),
                paper=(f"paper: {model}", PAPER_CIFAR10_ACC[model]),
                about="The paper's exact CIFAR-10 configuration (REFERENCE.md §2), for GPU/TPU.",
            )
            for model in PAPER_CIFAR10_ACC
        ),
        *(
            Protocol(
                f"paper-ptb-{model}", "ptb", f"paper-ptb-{model}",
                dict(model=model, epochs=200, batch_size=20), _seven(),
                paper=(f"paper: {model}", PAPER_PTB_PPL[model]),
                about="The paper's PTB configuration (REFERENCE.md §2; LSTM sizes are this project's choice).",
            )
            for model in PAPER_PTB_PPL
        ),
    )
}


def _slug(label: str) -> str:
  return label.replace(" ", "-").replace("/", "_").replace("=", "")


def run_dir(protocol: Protocol, variant: Variant, seed: int, root: pathlib.Path = RESULTS) -> pathlib.Path:
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
  trainer = _trainer(protocol.task)
  config_fields = {**protocol.config, **(overrides or {})}
  epochs = config_fields["epochs"]
  variants = [v for v in protocol.variants if not only or v.label in only or v.optimizer in only]
  # The optimizers the paper's claims are about go first, so a grid cut short has them.
  variants.sort(key=lambda v: FIRST.index(v.optimizer) if v.optimizer in FIRST else len(FIRST))
  if only and not variants:
    valid = ", ".join(v.label for v in protocol.variants)
    raise ValueError(f"--only {list(only)} matches no run of {protocol.name}; valid: {valid}")
  for seed in range(seeds):
    for variant in variants:
      workdir = run_dir(protocol, variant, seed, root)
      done = _finished_epochs(workdir)
      if done >= epochs:
        print(f"[{protocol.name}] {variant.label} seed {seed}: finished, skipped", flush=True)
        continue
      print(
          f"[{protocol.name}] {variant.label} seed {seed}: "
          + ("resuming" if done else "starting") + f" in {workdir}",
          flush=True,
      )
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
      )
      trainer.train_and_evaluate(config)
      print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
      write_report(protocol, seeds=seeds, root=root)


# ---- the report: from the metrics files only ----


def _collect(protocol: Protocol, seeds: int, root: pathlib.Path) -> dict[str, list[list[dict[str, Any]]]]:
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


def _mean_spread(values: Sequence[float]) -> tuple[float, float | None]:
  if len(values) == 1:
    return values[0], None
  return statistics.fmean(values), statistics.stdev(values)


def _fmt(mean: float, spread: float | None, digits: int = 2) -> str:
  if not math.isfinite(mean):
    return str(mean)
  return f"{mean:.{digits}f}" + ("" if spread is None else f" ± {spread:.{digits}f}")


def table(protocol: Protocol, seeds: int, root: pathlib.Path = RESULTS) -> str:
  """The protocol's results table (markdown) from its runs' metrics files."""
  key, name, higher, scale = _metric(protocol)
  epochs = protocol.config["epochs"]
  early = max(1, epochs // 4)
  runs = _collect(protocol, seeds, root)
  finals: dict[str, tuple[float, float | None, int]] = {}
  rows = []
  for variant in protocol.variants:
    histories = [h for h in runs.get(variant.label, []) if len(h) >= epochs]
    partial = [h for h in runs.get(variant.label, []) if len(h) < epochs]
    if not histories:
      status = f"running or interrupted ({max(len(h) for h in partial)}/{epochs} epochs)" if partial else "not run"
      rows.append((variant, None, status))
      continue
    final = [scale * h[epochs - 1][key] for h in histories]
    finals[variant.label] = (*_mean_spread(final), len(final))
    rows.append((variant, histories, ""))
  best = None
  if finals:
    pick = max if higher else min
    best = pick(finals, key=lambda label: finals[label][0])
  paper_title, paper = protocol.paper if protocol.paper else (None, {})
  header = [
      "optimizer", f"final {name}", f"{name}, epoch {early}", "final train loss",
      f"train loss, epoch {early}", "seeds",
  ]
  if paper_title:
    header.append(paper_title)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for variant, histories, status in rows:
    cells = [variant.label]
    if histories is None:
      cells += [status, "", "", "", "0"]
    else:
      mean, spread, n = finals[variant.label]
      text = _fmt(mean, spread)
      cells.append(f"**{text}**" if variant.label == best else text)
      cells.append(_fmt(*_mean_spread([scale * h[early - 1][key] for h in histories])))
      cells.append(_fmt(*_mean_spread([h[epochs - 1]["train_loss"] for h in histories]), 3))
      cells.append(_fmt(*_mean_spread([h[early - 1]["train_loss"] for h in histories]), 3))
      cells.append(str(n))
    if paper_title:
      value = paper.get(variant.optimizer) if not variant.hparams else None
      cells.append("" if value is None else f"{value:.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_report(protocol: Protocol, *, seeds: int, root: pathlib.Path = RESULTS) -> pathlib.Path:
  """Writes ``root/PROTOCOL/table.md`` and the figures; returns the folder."""
  from examples import plot

  out = root / protocol.name
  out.mkdir(parents=True, exist_ok=True)
  command = f"python -m benchmarks.reproduce {protocol.name}" + (
      f" --seeds {seeds}" if seeds != protocol.seeds else ""
  )
  text = (
      f"# {protocol.name}\n\n{protocol.about}\n\nMade by `{command}`; regenerate the tables and "
      f"figures from the committed metrics with `{command} --report-only`. Mean ± standard "
      f"deviation over seeds where there is more than one; best final value in bold. Runs: "
      f"`benchmarks/results/runs/{protocol.setting}/`.\n\n{table(protocol, seeds, root)}"
  )
  (out / "table.md").write_text(text)
  workdirs, labels = [], []  # one line per variant: the mean over its seeds, their range shaded
  for variant in protocol.variants:
    group = [str(w) for seed in range(seeds) if _finished_epochs(w := run_dir(protocol, variant, seed, root))]
    if group:
      workdirs.append(group)
      labels.append(variant.label)
  if workdirs:
    name = "figure1_p_sweep.png" if protocol.figure == "psweep" else "figure2_curves.png"
    plot.plot(workdirs, str(out / name), labels, title=f"{protocol.name}: {protocol.config.get('model')}")
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("protocol", nargs="?", choices=sorted(PROTOCOLS), metavar="PROTOCOL",
                      help=f"one of: {', '.join(PROTOCOLS)}")
  parser.add_argument("--list", action="store_true", help="list the protocols and exit")
  parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the protocol's)")
  parser.add_argument("--only", nargs="*", default=(), help="only these optimizers / labels")
  parser.add_argument("--data-dir", default=None, help="dataset folder (default: $PADAM_DATA_DIR)")
  parser.add_argument("--report-only", action="store_true", help="only rewrite table and figures")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  if args.list or args.protocol is None:
    for p in PROTOCOLS.values():
      print(f"{p.name:24s} {p.task:8s} {len(p.variants)} variants x {p.seeds} seed(s): {p.about[:80]}")
    return 0
  protocol = PROTOCOLS[args.protocol]
  seeds = protocol.seeds if args.seeds is None else args.seeds
  if seeds < 1:
    parser.error(f"--seeds must be >= 1, got {seeds}")
  if not args.report_only:
    from examples import cli

    cli.configure_xla([])
    try:
      run_grid(protocol, seeds=seeds, only=args.only, data_dir=args.data_dir,
               progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  out = write_report(protocol, seeds=seeds)
  print((out / "table.md").read_text())
  return 0


if __name__ == "__main__":
  sys.exit(main())
