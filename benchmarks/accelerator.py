"""One command for an accelerator: the update-step table, trainer throughput, then gpu-short.

Run from the repository root::

  python -m benchmarks.accelerator --out DIR --data-dir DATA              # ~10 minutes on a GPU
  python -m benchmarks.accelerator --out DIR --data-dir DATA --tiny       # a CPU rehearsal

Three steps, in this order:

1. ``update-step``: the optimizer step on the device, from ``benchmarks/update_speed.py``: Padam
   with ``p = 1/8``, Padam with ``p`` traced (``optax.inject_hyperparams``), ``optax.amsgrad``,
   ``optax.adam`` and the data-movement floor, over the ResNet-18-shaped and the ~100M-parameter
   transformer-shaped trees. Each timed call runs several steps in one jitted loop, so the time
   is the device's, not the launch's. Reported: milliseconds per step and the bytes a step must
   move (each parameter array's gradient, parameters and optimizer state read, parameters and
   state written) per second, against the device's peak memory bandwidth where its kind is in
   :data:`benchmarks.kit.PEAK_BANDWIDTH` ("unknown" otherwise, e.g. on a CPU).
2. ``throughput``: the trainers' own speed, each row one trainer run in a fresh process
   (``examples/cifar10/speed.py``, ``examples/ptb/speed.py``): ResNet-18 images/s in float32 and
   in bfloat16 (``--dtype bfloat16``; a trainer without that flag gets the row skipped, with the
   reason) and the 2-layer AWD-LSTM's tokens/s.
3. ``gpu-short``: the protocol of ``benchmarks/reproduce.py``, its runs in ``DIR/runs/gpu-short/``,
   its table and figure in ``DIR/gpu-short/``.

Each step writes ``DIR/STEP.json`` and ``DIR/STEP.md`` as soon as it finishes (and after each tree,
row or run, so a run cut short keeps what it measured) and rewrites ``DIR/summary.md``: the device,
the versions, each step's status and time, what was not done and why, and the tables. Run again
with the same ``--out``, the command skips the steps that are done (on the same kind of device),
keeps the finished parts of the others, and resumes gpu-short's runs from their checkpoints (a
finished run's checkpoints are deleted: it is never resumed).
``--budget-minutes`` bounds the time: no tree, row or run starts when it would not end in time (a
trainer process still running at the limit is killed), and the summary says what was not done.
The trainers' standard error goes to ``DIR/logs/``.

``--data-dir`` names a folder holding ``cifar10.npz`` and the Penn Treebank files, directly or in
its ``ptb/`` subfolder; without it the trainers' defaults (``$PADAM_DATA_DIR``, then their cache)
are used, with no download. A step or row whose data is missing is skipped, with the reason.

``--tiny`` shrinks everything (the quick update-step trees, a few steps of the smallest models,
and ``gpu-short-tiny``: 2 optimizers, 2 epochs of a half-width ResNet-8 on 256 images), so the
whole kit rehearses end to end on a CPU in a few minutes.

The kit's sizes, device and output folder are in :mod:`benchmarks.kit`, its steps in
:mod:`benchmarks.kit_steps`, their tables and the summary in :mod:`benchmarks.kit_report`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from benchmarks.kit import FINAL, STEPS, Kit, find_data, full_settings, tiny_settings
from benchmarks.kit_report import not_done, write_summary
from benchmarks.kit_steps import STEP_FUNCTIONS


def run_kit(kit: Kit, steps: Sequence[str] = STEPS) -> int:
  """Runs ``steps`` (in the kit's order), skipping those done; returns 1 if any part failed."""
  kit.log(
    f"device {kit.device['device_kind']} ({kit.device['platform']}), jax {kit.device['jax']}, "
    f"budget {kit.budget_seconds:.0f} s, output {kit.out}"
  )
  for step in STEPS:
    if step not in steps:
      continue
    previous = kit.load(step)
    if previous is not None and previous["status"] in FINAL:
      kit.log(f"{step}: {previous['status']} in an earlier run, skipped")
      continue
    kit.log(f"{step}: starting, {max(kit.left(), 0):.0f} s of the budget left")
    STEP_FUNCTIONS[step](kit, previous)
  write_summary(kit)
  records = kit.records()
  for step, record in records.items():
    for line in not_done(step, record):
      kit.log(f"not done: {line[2:]}")
  kit.log(f"summary: {kit.out / 'summary.md'}")
  return 1 if any(r["status"] == "failed" for r in records.values()) else 0


def _command(argv: Sequence[str], data_dir: str | None) -> str:
  text = shlex.join(["python", "-m", "benchmarks.accelerator", *argv])
  return text.replace(data_dir, "DATA") if data_dir else text


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.accelerator", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--out", required=True, metavar="DIR", help="output folder (resumable)")
  parser.add_argument(
    "--data-dir",
    default=None,
    metavar="DIR",
    help="folder holding cifar10.npz and the PTB files (directly or in ptb/)",
  )
  parser.add_argument("--tiny", action="store_true", help="tiny sizes: a rehearsal on a CPU")
  parser.add_argument(
    "--budget-minutes",
    type=float,
    default=9.0,
    help="stop starting work that would not end within this time (default: %(default)s)",
  )
  parser.add_argument(
    "--only", nargs="+", choices=STEPS, default=STEPS, metavar="STEP", help="run only these steps"
  )
  parser.add_argument(
    "--redo",
    nargs="+",
    choices=STEPS,
    default=(),
    metavar="STEP",
    help="run these steps again even when done (gpu-short's finished runs are still kept)",
  )
  args = parser.parse_args(argv)
  if not args.budget_minutes > 0:
    parser.error(f"--budget-minutes must be > 0, got {args.budget_minutes}")
  # Before JAX starts its backend: this process allocates device memory as it needs it, leaving
  # the rest to the trainer processes; XNNPACK on a CPU, as the trainers have it.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  from examples import cli

  cli.configure_xla([])
  settings = tiny_settings() if args.tiny else full_settings()
  kit = Kit(
    args.out,
    settings,
    find_data(args.data_dir),
    args.budget_minutes * 60,
    command=_command(sys.argv[1:] if argv is None else argv, args.data_dir),
    redo=args.redo,
  )
  return run_kit(kit, args.only)


if __name__ == "__main__":
  sys.exit(main())
