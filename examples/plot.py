"""Train loss and test error against epochs for one or more runs (the paper's Figure 2), to PNG.

  python -m examples.plot RUN_DIR [RUN_DIR ...] --out curves.png [--labels A B ...]

(``python examples/plot.py ...`` runs it too.) Needs matplotlib, from the ``examples`` extra:
``pip install -e ".[examples]"``.

Each RUN_DIR is a trainer's ``--workdir`` (or its ``metrics.jsonl``), read with
:func:`examples.metrics.read_metrics`. Image runs plot ``train_loss`` and the validation error
``1 - val_acc`` (with a validation split), else the test error ``1 - test_acc``; language model runs
plot ``train_loss`` and the validation perplexity ``valid_ppl`` (else ``test_ppl``).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from examples import metrics

MISSING_MATPLOTLIB = 'examples.plot needs matplotlib: pip install -e ".[examples]"'


def _label(workdir: str) -> str:
  try:
    config = metrics.read_run(workdir)["config"]
    return f"{config.get('optimizer')} ({config.get('model', '')})".replace(" ()", "")
  except (OSError, KeyError, ValueError):
    return pathlib.Path(workdir).name


def _labels(workdirs: Sequence[str]) -> list[str]:
  """:func:`_label` of each run; runs whose labels would be the same get their folder's name
  added (``padam (resnet20), c10-padam-2``), so that the legend tells them apart."""
  labels = [_label(w) for w in workdirs]
  shown = []
  for workdir, label in zip(workdirs, labels, strict=True):
    path = pathlib.Path(workdir)
    name = path.parent.name if path.name == "metrics.jsonl" else path.name
    shown.append(f"{label}, {name}" if labels.count(label) > 1 else label)
  return shown


# The right panel's metric: the first of these that the runs record (validation before test).
RIGHT_KEYS = (
  ("val_acc", "validation error"),
  ("test_acc", "test error"),
  ("valid_ppl", "validation perplexity"),
  ("test_ppl", "test perplexity"),
)


def _curves(
  workdirs: Sequence[str],
) -> tuple[list[float], list[list[float]], list[float], list[list[float]], str]:
  """Epochs and train losses, then the evaluated epochs and their validation or test errors (or
  perplexities), per run, over the epochs all runs have. Epochs without an evaluation (see
  ``--eval-every``) have no point on the right."""
  histories = [metrics.read_metrics(w) for w in workdirs]
  length = min(len(h) for h in histories)
  if length == 0:
    raise ValueError(f"no finished epoch in {', '.join(workdirs)}")
  epochs = [r["epoch"] for r in histories[0][:length]]
  train = [[r["train_loss"] for r in h[:length]] for h in histories]
  recorded = set().union(*(r.keys() for r in histories[0][:length]))
  key, name = next((k, n) for k, n in RIGHT_KEYS if k in recorded)
  evaluated = [r["epoch"] for r in histories[0][:length] if key in r]
  error = key.endswith("_acc")
  test = [[1.0 - r[key] if error else r[key] for r in h[:length] if key in r] for h in histories]
  return epochs, train, evaluated, test, name


def _pyplot():
  """``matplotlib.pyplot`` on the file-only Agg backend; an ImportError that says what to install."""
  try:
    import matplotlib
  except ImportError as error:
    raise ImportError(MISSING_MATPLOTLIB) from error

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _legend_rows(entries: int) -> int:
  """How many rows the figure legend (three entries a row) takes, to size the figure for it."""
  return -(-entries // 3)


def _finish(plt, fig, out: str, title: str | None, legend) -> None:
  """Puts one legend below the panels (so that no entry hides a curve), the title, and saves
  ``fig`` to ``out`` (creating its folder)."""
  handles, labels = legend
  fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)))
  if title:
    fig.suptitle(title)
  pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)


def plot(
  workdirs: Sequence[str | Sequence[str]],
  out: str,
  labels: Sequence[str] | None = None,
  title: str | None = None,
) -> None:
  """Draws the curves of ``workdirs`` side by side and saves them to ``out``.

  Args:
    workdirs: run folders (or metrics files); an entry may also be a list of folders, the seeds
      of one configuration, drawn as their mean with the range between the lowest and highest
      seed shaded (over the epochs every seed has).
    out: the PNG to write.
    labels: one legend entry per entry of ``workdirs``; by default the optimizer (and model)
      from the first run's ``run.json``.
    title: an optional figure title.
  """
  plt = _pyplot()
  import numpy as np
  from matplotlib import ticker

  groups = [[w] if isinstance(w, str | pathlib.Path) else list(w) for w in workdirs]
  if any(not group for group in groups):
    raise ValueError("an empty group of runs")
  labels = list(labels) if labels else _labels([str(group[0]) for group in groups])
  if len(labels) != len(groups):
    raise ValueError(f"{len(labels)} labels for {len(groups)} runs")
  rows = _legend_rows(len(groups))
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4 + 0.3 * rows), layout="constrained")
  curves = [_curves([str(w) for w in group]) for group in groups]
  right_keys = {c[-1] for c in curves}
  if len(right_keys) > 1:
    kinds = "; ".join(f"{groups[i][0]}: {c[-1]}" for i, c in enumerate(curves))
    raise ValueError(f"the runs evaluate different things ({kinds}); plot them in separate figures")
  (right_key,) = right_keys
  for group, label, (epochs, train, evaluated, test, _) in zip(groups, labels, curves, strict=True):
    panels = ((left, epochs, np.asarray(train)), (right, evaluated, np.asarray(test)))
    for axis, xs, values in panels:
      (line,) = axis.plot(
        xs,
        values.mean(axis=0),
        marker="." if len(xs) <= 60 else None,
        label=label if len(group) == 1 else f"{label} (mean of {len(group)})",
      )
      if len(group) > 1:
        axis.fill_between(
          xs,
          values.min(axis=0),
          values.max(axis=0),
          color=line.get_color(),
          alpha=0.2,
          linewidth=0,
        )
  left.set(xlabel="epoch", ylabel="train loss", yscale="log")
  # Plain numbers on the log axis ("5.4", not "5.4 x 10^0"), minor ticks labelled on short ranges.
  left.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
  left.yaxis.set_minor_formatter(
    ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4))
  )
  right.set(xlabel="epoch", ylabel=right_key)
  for axis in (left, right):
    axis.grid(alpha=0.3)
  _finish(plt, fig, out, title, left.get_legend_handles_labels())


def plot_rates(
  series: Sequence[tuple[str, Sequence[tuple[float, float]], float | None]],
  out: str,
  ylabel: str,
  title: str | None = None,
  yscale: str = "linear",
) -> None:
  """Draws a final score against the learning rate (log scale), one line per label, and saves the
  figure to ``out``: how each optimizer's result depends on its rate, and where its optimum is.

  Args:
    series: ``(label, [(learning rate, score), ...], chosen rate or None)`` per line; the chosen
      rate's point is ringed.
    out: the PNG to write.
    ylabel: what the score is.
    title: an optional figure title.
    yscale: the score axis's scale, ``"linear"`` or ``"log"`` (perplexities).
  """
  plt = _pyplot()
  rows = _legend_rows(len(series))
  fig, axis = plt.subplots(figsize=(7, 4.2 + 0.3 * rows), layout="constrained")
  for label, points, chosen in series:
    rates, scores = zip(*sorted(points), strict=True) if points else ((), ())
    (line,) = axis.plot(rates, scores, marker="o", label=label)
    for rate, score in points:
      if rate == chosen:
        axis.plot(rate, score, marker="o", markersize=14, fillstyle="none", color=line.get_color())
  axis.set(xlabel="learning rate", ylabel=ylabel, xscale="log", yscale=yscale)
  axis.grid(alpha=0.3, which="both")
  _finish(plt, fig, out, title, axis.get_legend_handles_labels())


def plot_batch_sizes(
  series: Sequence[tuple[str, Sequence[tuple[int, Sequence[float]]]]],
  out: str,
  ylabel: str,
  title: str | None = None,
) -> None:
  """Draws a final score against the batch size (log scale), one line per label through the means
  over seeds, each point's bar spanning its lowest and highest seed, and saves it to ``out``.

  Args:
    series: ``(label, [(batch size, [score of each seed, ...]), ...])`` per line.
    out: the PNG to write.
    ylabel: what the score is.
    title: an optional figure title.
  """
  plt = _pyplot()
  import numpy as np

  rows = _legend_rows(len(series))
  fig, axis = plt.subplots(figsize=(7, 4.2 + 0.3 * rows), layout="constrained")
  for label, points in series:
    points = sorted((size, np.asarray(values, float)) for size, values in points if len(values))
    sizes = [size for size, _ in points]
    means = np.array([values.mean() for _, values in points])
    spread = np.array([[m - v.min(), v.max() - m] for m, (_, v) in zip(means, points, strict=True)])
    seeds = sorted({len(v) for _, v in points})
    shown = f"{label} ({'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''})"
    axis.errorbar(
      sizes, means, yerr=spread.T if len(points) else None, marker="o", capsize=4, label=shown
    )
  axis.set(xlabel="batch size (sequences a step; same tokens in all)", ylabel=ylabel, xscale="log")
  sizes = sorted({size for _, points in series for size, _ in points})
  axis.set_xticks(sizes, [str(size) for size in sizes])
  axis.set_xticks([], minor=True)  # the log axis's own minor ticks would label over them
  axis.grid(alpha=0.3)
  _finish(plt, fig, out, title, axis.get_legend_handles_labels())


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m examples.plot", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument(
    "workdirs", nargs="+", help="run folders (--workdir of a trainer) or metrics.jsonl files"
  )
  parser.add_argument("--out", required=True, help="PNG file to write")
  parser.add_argument("--labels", nargs="+", default=None, help="legend entries, one per run")
  parser.add_argument("--title", default=None)
  args = parser.parse_args(argv)
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    print(MISSING_MATPLOTLIB, file=sys.stderr)
    return 1
  try:
    plot(args.workdirs, args.out, args.labels, args.title)
  except FileNotFoundError as e:
    print(f"error: no metrics file: {e.filename} (is the run folder right?)", file=sys.stderr)
    return 2
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
