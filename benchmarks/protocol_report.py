"""A protocol's report, from its runs' metrics files only: ``table.md`` and the figures.

An untuned protocol's table is the paper's Table 1/3 layout (:func:`results_table` computes it as
numbers, :func:`render` writes it); a tuned protocol's tables (the learning-rate grid, the results
at the chosen rates, the paired differences) come from :func:`benchmarks.tuning.report`.
:func:`write_report` writes them with the figures into ``root/PROTOCOL/``.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

from benchmarks import protocols, stats, tuning
from benchmarks.protocols import RESULTS, Protocol, Variant, finished_epochs, run_dir, slug
from examples import metrics


def _collect(
  protocol: Protocol, seeds: int, root: pathlib.Path
) -> dict[str, list[list[dict[str, Any]]]]:
  """label -> list (one per seed that has any epoch) of per-epoch records."""
  runs: dict[str, list[list[dict[str, Any]]]] = {}
  for variant in protocol.variants:
    for seed in range(seeds):
      workdir = run_dir(protocol, variant, seed, root)
      if finished_epochs(workdir):
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
      if finished_epochs(w := run_dir(protocol, variant, seed, root))
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
    f"seeds. Runs: `{runs}`.\n\n" + tuning.report(protocol, protocols.PROTOCOLS, root, seeds)
  )
  (out / "table.md").write_text(text)
  groups = tuning.chosen_workdirs(protocol, protocols.PROTOCOLS, root, seeds)
  if groups:
    name = "figure1_p_sweep.png" if protocol.figure == "psweep" else "figure2_curves.png"
    plot.plot(
      [folders for _, folders in groups],
      str(out / name),
      [label for label, _ in groups],
      title=f"{protocol.name}: {protocol.config.get('model')}, each at its chosen learning rate",
    )
  if protocol.figure == "batch":
    _write_batch_figure(protocol, out, seeds, root, plot)
  if series := tuning.grid_points(protocol, protocols.PROTOCOLS, root):
    scale = tuning.select_scale(protocol)
    plot.plot_rates(
      [
        (label, [(rate, scale * score) for rate, score in points], chosen)
        for label, points, chosen in series
      ],
      str(out / "learning_rate_grid.png"),
      f"final {tuning.select_name(protocol)} (seed 0)",
      yscale="log" if protocol.tuning.lower_is_better else "linear",
      title=f"{protocol.name}: {protocol.config.get('model')}, the learning-rate grid (chosen ringed)",
    )
  return out


def _write_batch_figure(
  protocol: Protocol, out: pathlib.Path, seeds: int, root: pathlib.Path, plot: Any
) -> None:
  """``test_by_batch_size.png``: each optimizer's final test metric at its chosen rate against the
  batch size (a variant's label is the optimizer's with `` bN`` appended)."""
  lines: dict[str, list[tuple[int, list[float]]]] = {}
  for variant in protocol.variants:
    found = tuning.result(protocol, variant, protocols.PROTOCOLS, root, seeds)
    if found.test:
      name = variant.label.rsplit(" b", 1)[0]
      lines.setdefault(name, []).append((variant.config["batch_size"], list(found.test.values())))
  if lines:
    measure = tuning.MEASURES[protocol.task]
    plot.plot_batch_sizes(
      list(lines.items()),
      str(out / "test_by_batch_size.png"),
      f"final {measure.test_name}",
      title=f"{protocol.name}: {protocol.config.get('model')}, each at its chosen learning rate",
    )


def has_runs(protocol: Protocol, seeds: int, root: pathlib.Path = RESULTS) -> bool:
  """Whether ``root`` holds a run of ``protocol`` with a finished epoch or a stop record: a report
  of no run would be all blanks."""
  if protocol.tuning is None:
    folders = [run_dir(protocol, v, s, root) for v in protocol.variants for s in range(seeds)]
  else:  # any learning rate and seed of the grids and of the chosen rates
    setting = root / "runs" / protocol.setting
    folders = [
      folder
      for variant in protocol.variants
      for folder in setting.glob(f"{slug(variant.run or variant.label)}-lr*-seed*")
    ]
  return any(finished_epochs(f) or metrics.read_stopped(f) is not None for f in folders)
