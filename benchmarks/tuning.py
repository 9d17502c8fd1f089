"""Learning rates tuned on a validation split: the grid, the choice, and the seeds at the choice.

A tuned protocol (a :class:`benchmarks.protocols.Protocol` with a ``Tuning``) runs, for each of
its variants, seed 0 at ``base * factor**k`` for ``k`` in ``Tuning.start`` (e.g. x1/3, x1, x3 of the
registry's rate); when the best final validation score is at an edge of the grid, the grid grows
past that edge (up to ``factor**reach``), so that the rate chosen is never a boundary of what was
tried unless the limit was reached. The chosen rate is then run with seeds ``1 .. seeds - 1``. A
variant with ``rate_of`` runs no grid: it uses the rate chosen for another protocol's variant.

Every decision is computed from the runs' metrics files, so a grid can be stopped and continued at
any time, or run on many machines (:func:`plan` lists what can run now).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks import stats
from benchmarks.protocols import Protocol, Tuning, Variant, slug
from examples import metrics


@dataclasses.dataclass(frozen=True)
class Job:
  """One run: a variant at ``base * factor**step`` with ``seed``, in ``workdir``."""

  variant: Variant
  step: int
  learning_rate: float
  seed: int
  workdir: pathlib.Path


@dataclasses.dataclass(frozen=True)
class Grid:
  """Where a variant's tuning stands.

  Attributes:
    variant: the variant.
    base: its base learning rate (the grid's x1).
    scores: grid step -> the final ``select`` value of its seed-0 run (NaN if it stopped on a
      non-finite loss), for the finished ones.
    pending: grid steps still to run (seed 0).
    chosen: the chosen step, once known.
    waiting: why nothing can run yet (a ``rate_of`` variant whose source is not chosen), or "".
  """

  variant: Variant
  base: float
  scores: dict[int, float]
  pending: tuple[int, ...]
  chosen: int | None
  waiting: str = ""


def step_tag(step: int, factor: float = 3.0) -> str:
  """``0 -> "x1"``, ``1 -> "x3"``, ``-1 -> "x1_3"``, ``2 -> "x9"``, ``-2 -> "x1_9"``."""
  value = factor ** abs(step)
  shown = f"{value:g}"
  return f"x{shown}" if step >= 0 else f"x1_{shown}"


def base_rate(protocol: Protocol, variant: Variant) -> float:
  """The variant's x1 rate: its ``base_lr``, else the registry's rate for the protocol's task."""
  if variant.base_lr is not None:
    return variant.base_lr
  from examples import optimizers

  hparams = optimizers.paper_hyperparams(variant.optimizer, protocol.registry_task)
  return float(hparams["learning_rate"])


def learning_rate(protocol: Protocol, variant: Variant, step: int) -> float:
  """``base * factor**step``, to 6 significant digits (so that commands and logs show 0.3)."""
  return float(f"{base_rate(protocol, variant) * protocol.tuning.factor**step:.6g}")


def run_dir(
  protocol: Protocol, variant: Variant, step: int, seed: int, root: pathlib.Path
) -> pathlib.Path:
  """The folder of a tuned protocol's run: ``root/runs/SETTING/LABEL-lrTAG-seedS``."""
  name = slug(variant.run or variant.label)
  tag = step_tag(step, protocol.tuning.factor)
  return root / "runs" / protocol.setting / f"{name}-lr{tag}-seed{seed}"


@dataclasses.dataclass(frozen=True)
class Measure:
  """What a task's tuned report shows: the final test and validation metrics and their names.

  Attributes:
    test, val: the keys of ``metrics.jsonl``.
    scale: shown as ``scale * value`` (100: a fraction shown in %).
    test_name, val_name: the table's column names.
    difference: the unit of a paired difference of ``test``.
  """

  test: str
  val: str
  scale: float
  test_name: str
  val_name: str
  difference: str


MEASURES = {
  "cifar10": Measure(
    "test_acc",
    "val_acc",
    100.0,
    "test accuracy % (10,000 images)",
    "validation accuracy %",
    "test accuracy points",
  ),
  "ptb": Measure(
    "test_ppl",
    "valid_ppl",
    1.0,
    "test perplexity",
    "validation perplexity",
    "test perplexity; lower is better",
  ),
}


def rank(tuning: Tuning, value: float) -> float:
  """``value`` as a score where higher is better; a non-finite stop (NaN) ranks last."""
  if math.isnan(value):
    return -math.inf
  return -value if tuning.lower_is_better else value


def shown(protocol: Protocol, value: float) -> str:
  """A final ``select`` value as the grid table shows it."""
  if math.isnan(value):
    return "non-finite"
  return f"{select_scale(protocol) * value:.1f}"


def select_scale(protocol: Protocol) -> float:
  """The display scale of the selecting metric (100 for an accuracy, else 1)."""
  measure = MEASURES[protocol.task]
  return measure.scale if protocol.tuning.select == measure.val else 1.0


def outcome(workdir: pathlib.Path, epochs: int, select: str) -> float | None:
  """The run's final ``select`` value; NaN if it stopped on a non-finite value; None if it is not
  finished."""
  if metrics.read_stopped(workdir) is not None:
    return math.nan
  try:
    history = metrics.read_metrics(workdir)
  except FileNotFoundError:
    return None
  if len(history) < epochs:
    return None
  return float(history[epochs - 1][select])


def grid(
  protocol: Protocol, variant: Variant, protocols: Mapping[str, Protocol], root: pathlib.Path
) -> Grid:
  """The variant's tuning state from the metrics files under ``root``."""
  tuning = protocol.tuning
  base = base_rate(protocol, variant)
  if variant.rate_of is not None:
    source_name, label = variant.rate_of
    source = protocols[source_name]
    (source_variant,) = [v for v in source.variants if v.label == label]
    chosen = grid(source, source_variant, protocols, root).chosen
    waiting = (
      "" if chosen is not None else f"waits for the rate chosen for {label} in {source_name}"
    )
    return Grid(variant, base, {}, (), chosen, waiting)
  epochs = protocol.config["epochs"]
  steps = set(tuning.start)
  while True:
    scores = {}
    for step in sorted(steps):
      score = outcome(run_dir(protocol, variant, step, 0, root), epochs, tuning.select)
      if score is not None:
        scores[step] = score
    pending = tuple(s for s in sorted(steps) if s not in scores)
    if pending:
      return Grid(variant, base, scores, pending, None)
    # The best score, the smaller rate on a tie.
    best = max(sorted(scores), key=lambda s: rank(tuning, scores[s]))
    if best == max(steps) and best < tuning.reach:
      steps.add(best + 1)
    elif best == min(steps) and best > -tuning.reach:
      steps.add(best - 1)
    else:
      return Grid(variant, base, scores, (), best)


def variant_seeds(variant: Variant, seeds: int) -> int:
  """How many seeds ``variant`` runs when its protocol runs ``seeds``: its own cap, if smaller."""
  return seeds if variant.seeds is None else min(seeds, variant.seeds)


def seeds_at_choice(protocol: Protocol, variant: Variant, seeds: int) -> range:
  """The seeds run at the chosen rate: 1.. (seed 0 is the grid's), or 0.. for a ``rate_of`` one."""
  return range(0 if variant.rate_of is not None else 1, variant_seeds(variant, seeds))


def plan(
  protocol: Protocol,
  protocols: Mapping[str, Protocol],
  root: pathlib.Path,
  seeds: int | None = None,
  only: Sequence[str] = (),
) -> list[Job]:
  """The runs that can start now and are not finished: the grids first, then the seeds."""
  seeds = protocol.tuning.seeds if seeds is None else seeds
  epochs = protocol.config["epochs"]
  grid_jobs, seed_jobs = [], []
  for variant in protocol.variants:
    if only and variant.label not in only and variant.optimizer not in only:
      continue
    state = grid(protocol, variant, protocols, root)
    for step in state.pending:
      grid_jobs.append(_job(protocol, variant, step, 0, root))
    if state.chosen is None:
      continue
    for seed in seeds_at_choice(protocol, variant, seeds):
      job = _job(protocol, variant, state.chosen, seed, root)
      if outcome(job.workdir, epochs, protocol.tuning.select) is None:
        seed_jobs.append(job)
  return grid_jobs + sorted(seed_jobs, key=lambda j: j.seed)


def _job(protocol: Protocol, variant: Variant, step: int, seed: int, root: pathlib.Path) -> Job:
  rate = learning_rate(protocol, variant, step)
  return Job(variant, step, rate, seed, run_dir(protocol, variant, step, seed, root))


# ---- the report: from the metrics files only ----


@dataclasses.dataclass(frozen=True)
class Result:
  """A variant at its chosen rate: one value per finished seed (display scale)."""

  label: str
  learning_rate: float | None
  test: dict[int, float]
  val: dict[int, float]
  train_loss: dict[int, float]
  stopped: dict[int, int]  # seed -> the last epoch finished before a non-finite stop


def result(
  protocol: Protocol,
  variant: Variant,
  protocols: Mapping[str, Protocol],
  root: pathlib.Path,
  seeds: int,
) -> Result:
  """The finished seeds of ``variant`` at its chosen rate."""
  state = grid(protocol, variant, protocols, root)
  if state.chosen is None:
    return Result(variant.label, None, {}, {}, {}, {})
  epochs = protocol.config["epochs"]
  test, val, loss, stopped = {}, {}, {}, {}
  measure = MEASURES[protocol.task]
  for seed in range(variant_seeds(variant, seeds)):
    workdir = run_dir(protocol, variant, state.chosen, seed, root)
    if (info := metrics.read_stopped(workdir)) is not None:
      stopped[seed] = int(info.get("after_epoch", 0))
      continue
    if outcome(workdir, epochs, protocol.tuning.select) is None:
      continue
    last = metrics.read_metrics(workdir)[epochs - 1]
    test[seed] = measure.scale * last[measure.test]
    val[seed] = measure.scale * last[measure.val]
    loss[seed] = last["train_loss"]
  rate = learning_rate(protocol, variant, state.chosen)
  return Result(variant.label, rate, test, val, loss, stopped)


def _mean_sd(values: Mapping[int, float], digits: int = 2) -> str:
  return stats.Stat.of(list(values.values())).format(digits) if values else ""


def _rate(value: float) -> str:
  return f"{value:.3g}"


def select_name(protocol: Protocol) -> str:
  """The selecting metric's name with its unit: ``"val_acc %"``, ``"valid_ppl"``."""
  select = protocol.tuning.select
  return f"{select} %" if select_scale(protocol) == 100 else select


def grid_table(
  protocol: Protocol, protocols: Mapping[str, Protocol], root: pathlib.Path
) -> list[str]:
  """The markdown lines of the grid: each rate tried with its final validation score."""
  lines = [
    f"| variant | rates tried: final {select_name(protocol)} (seed 0) | chosen rate |",
    "|---|---|---|",
  ]
  for variant in protocol.variants:
    state = grid(protocol, variant, protocols, root)
    if variant.rate_of is not None:
      source = f"{variant.rate_of[1]}'s in {variant.rate_of[0]}"
      chosen = "" if state.chosen is None else _rate(learning_rate(protocol, variant, state.chosen))
      lines.append(f"| {variant.label} | (no grid: {source}) | {chosen} |")
      continue
    cells = []
    for step in sorted({*state.scores, *state.pending}):
      rate = _rate(learning_rate(protocol, variant, step))
      score = state.scores.get(step)
      cell = f"{rate}: {'not run yet' if score is None else shown(protocol, score)}"
      cells.append(f"**{cell}**" if step == state.chosen else cell)
    chosen = "" if state.chosen is None else _rate(learning_rate(protocol, variant, state.chosen))
    if state.chosen is not None and abs(state.chosen) == protocol.tuning.reach:
      chosen += " (the grid's limit: a rate past it was not tried)"
    lines.append(f"| {variant.label} | {', '.join(cells)} | {chosen} |")
  return lines


def grid_points(
  protocol: Protocol, protocols: Mapping[str, Protocol], root: pathlib.Path
) -> list[tuple[str, list[tuple[float, float]], float | None]]:
  """``(label, [(rate, final select score)], chosen rate or None)`` for each variant with a grid
  that has a finished finite run (seed 0); a run stopped on a non-finite value has no point."""
  series = []
  for variant in protocol.variants:
    state = grid(protocol, variant, protocols, root)
    points = [
      (learning_rate(protocol, variant, step), score)
      for step, score in sorted(state.scores.items())
      if not math.isnan(score)
    ]
    if points:
      chosen = None if state.chosen is None else learning_rate(protocol, variant, state.chosen)
      series.append((variant.label, points, chosen))
  return series


def results_lines(
  protocol: Protocol,
  protocols: Mapping[str, Protocol],
  root: pathlib.Path,
  seeds: int,
  compare: Sequence[tuple[str, str]] = (),
) -> list[str]:
  """The markdown lines of the results at the chosen rates and the paired differences."""
  results = {v.label: result(protocol, v, protocols, root, seeds) for v in protocol.variants}
  measure = MEASURES[protocol.task]
  lines = [
    f"| variant | rate | seeds | {measure.test_name} | {measure.val_name} | final train loss |",
    "|---|---|---|---|---|---|",
  ]
  for r in results.values():
    rate = "" if r.learning_rate is None else _rate(r.learning_rate)
    stopped = "".join(
      f" (seed {s} stopped non-finite after epoch {e})" for s, e in sorted(r.stopped.items())
    )
    lines.append(
      f"| {r.label} | {rate} | {len(r.test)}{stopped} | {_mean_sd(r.test)} | "
      f"{_mean_sd(r.val)} | {_mean_sd(r.train_loss, 3)} |"
    )
  if compare:
    lines += [
      "",
      f"| difference ({measure.difference}) | seeds paired | mean | 95% interval |",
      "|---|---|---|---|",
    ]
    for a, b in compare:
      diff = stats.paired(results[a].test, results[b].test)
      if diff is None:
        lines.append(f"| {a} - {b} | 0 | | |")
        continue
      mean, half, n = diff
      interval = "" if math.isnan(half) else f"[{mean - half:+.2f}, {mean + half:+.2f}]"
      lines.append(f"| {a} - {b} | {n} | {mean:+.2f} | {interval} |")
  return lines


def report(
  protocol: Protocol,
  protocols: Mapping[str, Protocol],
  root: pathlib.Path,
  seeds: int,
) -> str:
  """The tables of a tuned protocol, in markdown."""
  lines = ["## Learning-rate grid", "", *grid_table(protocol, protocols, root), ""]
  lines += ["## At the chosen rates", ""]
  lines += results_lines(protocol, protocols, root, seeds, protocol.compare)
  return "\n".join(lines) + "\n"


def _finite(value: float | None) -> bool:
  return value is not None and not math.isnan(value)


def chosen_workdirs(
  protocol: Protocol, protocols: Mapping[str, Protocol], root: pathlib.Path, seeds: int
) -> list[tuple[str, list[str]]]:
  """(label, the workdirs of its finished seeds at the chosen rate) per variant that has any."""
  groups = []
  epochs = protocol.config["epochs"]
  for variant in protocol.variants:
    state = grid(protocol, variant, protocols, root)
    if state.chosen is None:
      continue
    folders = [
      str(w)
      for seed in range(variant_seeds(variant, seeds))
      if _finite(
        outcome(
          w := run_dir(protocol, variant, state.chosen, seed, root), epochs, protocol.tuning.select
        )
      )
    ]
    if folders:
      groups.append((variant.label, folders))
  return groups


def describe(job: Job) -> dict[str, Any]:
  return {"label": job.variant.label, "lr": job.learning_rate, "seed": job.seed}
