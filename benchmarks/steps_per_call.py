"""The trainers' throughput on this machine before and after ``--steps-per-call``, side by side.

  python -m benchmarks.steps_per_call --baseline REV --data-dir DIR [--ptb-dir PTB_DIR]
      [--repeats 3] [--out benchmarks/results/steps_per_call.md]

Each measurement is one trainer run in a fresh process (``examples.cifar10.speed.measure`` and
``examples.ptb.speed.measure``: one epoch, the throughput of its training steps, compilation
excluded). "before" runs the trainers of git revision ``REV`` (exported to a temporary folder);
"after" runs this tree's, with one step a call (``--steps-per-call 1``, the CPU's default) and with
8. The shapes: ResNet-8 at half width and batch 16 (the host's work per step weighs most), ResNet-8
at batch 32 (the mini protocols' shape), and the 2-layer LSTM ``lstm2-small``. Every round runs
every row once, in turn, so that a drift of a shared machine hits all rows alike; the table gives
the median over the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence

from benchmarks.speed_report import cpu_model
from examples.cifar10 import speed as cifar_speed
from examples.ptb import speed as ptb_speed

ROOT = pathlib.Path(__file__).resolve().parent.parent
# (label, trainer, model, batch, steps)
SHAPES = (
  ("ResNet-8 x0.5, batch 16", "cifar10", "resnet8_w0.5", 16, 48),
  ("ResNet-8, batch 32", "cifar10", "resnet8", 32, 32),
  ("lstm2-small, batch 20", "ptb", "lstm2-small", 20, 40),
)
# (label, which tree, extra trainer flags)
VARIANTS = (
  ("before", "baseline", ()),
  ("after, 1 step a call", "tree", ("--steps-per-call", "1")),
  ("after, 8 steps a call", "tree", ("--steps-per-call", "8")),
)


@contextlib.contextmanager
def exported(revision: str) -> Iterator[pathlib.Path]:
  """The files of git ``revision`` in a temporary folder."""
  with tempfile.TemporaryDirectory() as folder:
    archive = subprocess.run(
      ["git", "archive", revision], cwd=ROOT, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    yield pathlib.Path(folder)


@contextlib.contextmanager
def working_in(folder: pathlib.Path) -> Iterator[None]:
  previous = pathlib.Path.cwd()
  os.chdir(folder)
  try:
    yield
  finally:
    os.chdir(previous)


def measurer(
  args: argparse.Namespace, trainer: str, model: str, batch: int, steps: int
) -> Callable:
  if trainer == "cifar10":
    return lambda extra: cifar_speed.measure(
      model, steps, batch, args.data_dir, True, "padam", extra_args=extra
    )
  return lambda extra: ptb_speed.measure(
    model, steps, batch, pathlib.Path(args.ptb_dir), True, "padam", 40, extra_args=extra
  )


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.steps_per_call", description=__doc__)
  parser.add_argument("--baseline", required=True, help="git revision of the trainers before")
  parser.add_argument("--data-dir", required=True, help="folder holding cifar10.npz")
  parser.add_argument("--ptb-dir", default=None, help="folder of the PTB files (default DIR/ptb)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="benchmarks/results/steps_per_call.md")
  args = parser.parse_args(argv)
  args.data_dir = str(pathlib.Path(args.data_dir).absolute())
  args.ptb_dir = str(pathlib.Path(args.ptb_dir or pathlib.Path(args.data_dir) / "ptb").absolute())
  rates: dict[tuple[str, str], list[float]] = {}
  loads = [os.getloadavg()[0]]
  with exported(args.baseline) as baseline:
    trees = {"baseline": baseline, "tree": ROOT}
    for round_ in range(args.repeats):
      for label, trainer, model, batch, steps in SHAPES:
        measure = measurer(args, trainer, model, batch, steps)
        for variant, tree, extra in VARIANTS:
          with working_in(trees[tree]):
            row = measure(list(extra))
          rate = row.get("images_per_second", row.get("tokens_per_second"))
          rates.setdefault((label, variant), []).append(rate)
          loads.append(os.getloadavg()[0])
          print(f"round {round_ + 1}: {label}, {variant}: {rate:.1f}", file=sys.stderr, flush=True)
  lines = [
    "# Throughput before and after --steps-per-call",
    "",
    f"Machine: {cpu_model()}, {os.cpu_count()} cores, no accelerator. Command: `python -m "
    f"benchmarks.steps_per_call --baseline {args.baseline} --data-dir DIR --repeats "
    f"{args.repeats}`. Load average (1 min) from {min(loads):.1f} to {max(loads):.1f} during the "
    "runs" + (" (other work shared the machine)" if max(loads) > 2.5 else "") + "; the rounds "
    "interleave the rows.",
    "",
    "Median over the rounds of the training steps' throughput (images/s, tokens/s for the LSTM); "
    'in brackets, the ratio to "before".',
    "",
    "| shape | " + " | ".join(v for v, _, _ in VARIANTS) + " |",
    "|---|" + "---:|" * len(VARIANTS),
  ]
  for label, *_ in SHAPES:
    base = statistics.median(rates[(label, VARIANTS[0][0])])
    cells = []
    for variant, _, _ in VARIANTS:
      value = statistics.median(rates[(label, variant)])
      cells.append(
        f"{value:.1f}" + ("" if variant == VARIANTS[0][0] else f" ({value / base:.2f}x)")
      )
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  lines.append("")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text("\n".join(lines))
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
