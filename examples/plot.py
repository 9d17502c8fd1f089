"""Train loss and test error against epochs for one or more runs (the paper's Figure 2), to PNG.

  python -m examples.plot RUN_DIR [RUN_DIR ...] --out curves.png [--labels A B ...]

Each RUN_DIR is a trainer's ``--workdir`` (or its ``metrics.jsonl``), read with
:func:`examples.results.read_metrics`. Image runs plot ``train_loss`` and ``1 - test_acc``; language
model runs (no ``test_acc``) plot ``train_loss`` and ``test_ppl``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from examples import results


def _label(workdir: str) -> str:
  try:
    config = results.read_run(workdir)["config"]
    return f"{config.get('optimizer')} ({config.get('model', '')})".replace(" ()", "")
  except (OSError, KeyError, ValueError):
    return pathlib.Path(workdir).name


def plot(
  workdirs: Sequence[str], out: str, labels: Sequence[str] | None = None, title: str | None = None
) -> None:
  """Draws the curves of ``workdirs`` side by side and saves them to ``out``.

  Args:
    workdirs: run folders (or metrics files).
    out: the PNG to write.
    labels: one legend entry per run; by default the optimizer (and model) from ``run.json``.
    title: an optional figure title.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  labels = list(labels) if labels else [_label(w) for w in workdirs]
  if len(labels) != len(workdirs):
    raise ValueError(f"{len(labels)} labels for {len(workdirs)} runs")
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  right_key = None
  for workdir, label in zip(workdirs, labels, strict=True):
    history = results.read_metrics(workdir)
    epochs = [r["epoch"] for r in history]
    left.plot(epochs, [r["train_loss"] for r in history], marker=".", label=label)
    if "test_acc" in history[0]:
      right_key = "test error"
      right.plot(epochs, [1.0 - r["test_acc"] for r in history], marker=".", label=label)
    else:
      right_key = "test perplexity"
      right.plot(epochs, [r["test_ppl"] for r in history], marker=".", label=label)
  left.set(xlabel="epoch", ylabel="train loss", yscale="log")
  right.set(xlabel="epoch", ylabel=right_key)
  for axis in (left, right):
    axis.grid(alpha=0.3)
    axis.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)


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
  plot(args.workdirs, args.out, args.labels, args.title)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
