"""Optimizer-step speed of Padam against Optax's and PyTorch's optimizers.

One jitted step (``tx.update`` then ``optax.apply_updates``, parameters and
state donated, as in a training loop) over a parameter tree shaped like a CIFAR
ResNet-18 and one shaped like a ~100M-parameter transformer, with fixed
gradients. Rows are interleaved: every round visits every optimizer in a
rotated order, builds its state (untimed), takes one untimed step and then
times ``--steps`` steps, so slow drifts of a shared machine hit all rows alike.
A first round is a warm-up (compilation) and is not timed.

Reported per row: median step time, its ratio to ``optax.amsgrad`` with the
same weight decay, its ratio to a data-movement floor (a jitted kernel that
reads and writes the same arrays as a Padam step with additions only) and the
optimizer state's bytes. For the JAX rows the compiled HLO is also summarised:
kernels per step, bytes they read and write, and transcendental operations per
element, which is where the time goes when a row misses its target.

Run from the repository root::

  python -m benchmarks.update_speed --out benchmarks/results/update_speed.md
  python -m benchmarks.update_speed --quick   # tiny trees, a smoke test
  python -m benchmarks.update_speed --no-torch --steps-per-call 50   # on an accelerator
  python -m benchmarks.update_speed --tree resnet18 --no-torch --rounds 15 \
    --rows "padam p=1/8" "padam p traced" "padam p=1/8, lr injected" "padam p=0.2" \
    "padam p=0.2 traced" "optax amsgrad" --out benchmarks/results/traced_p_speed.md
    # chosen rows only, a short table

``--steps-per-call K`` runs K steps in one jitted ``lax.fori_loop`` per timed call and reports
the time per step: on an accelerator a step of these trees takes less time than the Python call
that launches it, so one step per call would time the launch, not the step.

``--rows`` also offers rows the full table leaves out (``padam p=0.2``, a
``p`` without a square-root form, as a number and traced; ``padam p=1/8, lr injected``, Padam under
``optax.inject_hyperparams`` with ``p`` among its ``static_args``).

The PyTorch rows need PyTorch (``pip install -e ".[bench]"``); without it they are skipped and
the output says so.

The parameter trees are in :mod:`benchmarks.param_trees`, the rows and their timing in
:mod:`benchmarks.step_timing`, the compiled step's counts in :mod:`benchmarks.hlo_counts`, the
tables in :mod:`benchmarks.speed_report`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import jax
import optax

import padam_jax

# ``benchmarks.state_memory`` takes its transformer tree from here.
from benchmarks.param_trees import transformer_shapes as transformer_shapes
from benchmarks.param_trees import trees
from benchmarks.speed_report import cpu_model, render, render_rows, targets
from benchmarks.step_timing import (
  WEIGHT_DECAY,
  Bench,
  choose_rows,
  make_rows,
  measure,
  power_forms,
  torch_rows,
)

LOAD_WARNING = 2.5  # load average above which timings on a 2-core machine are noisy


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.update_speed", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--quick", action="store_true", help="tiny trees and few repeats")
  parser.add_argument("--out", default=None, help="markdown file to write (default: stdout only)")
  parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7, quick 2)")
  parser.add_argument("--steps", type=int, default=3, help="timed calls per row per round")
  parser.add_argument(
    "--steps-per-call",
    type=int,
    default=1,
    help="optimizer steps per timed call of a JAX row, in a jitted loop (on an accelerator, "
    "enough that a call takes well over its launch)",
  )
  parser.add_argument(
    "--no-torch",
    action="store_true",
    help="skip the PyTorch rows (skipped anyway when PyTorch is not installed)",
  )
  parser.add_argument(
    "--tree",
    choices=("all", "resnet18", "transformer"),
    default="all",
    help="which parameter tree(s) to time",
  )
  parser.add_argument(
    "--rows",
    nargs="+",
    metavar="NAME",
    default=None,
    help='time only these rows, by name (e.g. "padam p traced"), and write a short table of them',
  )
  args = parser.parse_args(argv)
  rounds = args.rounds or (2 if args.quick else 7)
  with_torch, torch_note = torch_rows(args.no_torch)

  def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

  if not with_torch:
    log(torch_note)
  load_start = os.getloadavg()
  if args.steps_per_call < 1:
    parser.error(f"--steps-per-call must be >= 1, got {args.steps_per_call}")
  results = []
  for _, name, shapes in trees(args.tree, args.quick):
    log(f"{name}: building")
    bench = Bench.build(name, shapes, with_torch, args.steps_per_call)
    # The per-parameter PyTorch loop takes seconds a step on the large tree: its
    # weight-decay row is timed on the ResNet tree only, to keep a run short.
    decays = (0.0, WEIGHT_DECAY) if not results else (0.0,)
    rows = choose_rows(make_rows(with_torch, decays), args.rows)
    measure(bench, rows, rounds, args.steps, log)
    results.append((bench, rows))
    del bench  # the next tree's arrays replace this one's
  if not args.rows:
    log("power forms")
    forms = power_forms(repeats=3 if args.quick else 9)
  load_end = os.getloadavg()

  command = shlex.join(["python", *sys.orig_argv[1:]])
  loads = (
    f"{', '.join(f'{x:.2f}' for x in load_start)} at start, "
    f"{', '.join(f'{x:.2f}' for x in load_end)} at end (1, 5, 15 min)"
  )
  if max(load_start[0], load_end[0], load_end[1]) >= LOAD_WARNING:
    loads += f" - above {LOAD_WARNING}: other work shared the CPU, treat ratios as noisy"
  header = {
    "command": f"`{command}`",
    "machine": f"{cpu_model()}, {os.cpu_count()} cores, {jax.devices()[0].platform} backend",
    "load average": loads,
    "versions": f"jax {jax.__version__}, optax {optax.__version__}, padam_jax "
    f"{padam_jax.__version__}, {torch_note}",
    "method": f"{rounds} interleaved rounds x {args.steps} timed steps per row after an untimed "
    "warm-up round; each visit builds the state, takes one untimed step, then times "
    "steps (update + apply_updates, parameters and state donated)",
  }
  if args.steps_per_call > 1:
    header["method"] += (
      f"; each timed call of a JAX row runs {args.steps_per_call} steps in a jitted "
      "lax.fori_loop, its time divided by them"
    )
  text = render_rows(results, header) if args.rows else render(results, header, targets, forms)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
