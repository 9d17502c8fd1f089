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

``--commands`` prints nothing on standard output when no run is left, and says so on standard
error. ``--report-only`` with no run of the protocol to report writes nothing and exits with
status 2, as an error does.

The protocols are in :mod:`benchmarks.protocols`, the running in :mod:`benchmarks.runs` (and
:mod:`benchmarks.tuning` for a tuned protocol's learning rates), the report in
:mod:`benchmarks.protocol_report`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from benchmarks import protocols, runs
from benchmarks.protocol_report import has_runs, write_report
from benchmarks.protocols import RESULTS


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "protocol",
    nargs="?",
    choices=sorted(protocols.PROTOCOLS),
    metavar="PROTOCOL",
    help=f"one of: {', '.join(protocols.PROTOCOLS)}",
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
    for p in protocols.PROTOCOLS.values():
      print(
        f"{p.name:24s} {p.task:8s} {len(p.variants)} variants x {p.seeds} seed(s): {p.about[:80]}"
      )
    return 0
  protocol = protocols.PROTOCOLS[args.protocol]
  default_seeds = protocol.tuning.seeds if protocol.tuning else protocol.seeds
  seeds = default_seeds if args.seeds is None else args.seeds
  if seeds < 1:
    parser.error(f"--seeds must be >= 1, got {seeds}")
  if args.commands:
    try:
      lines = runs.commands(
        protocol, seeds=seeds, only=args.only, data_dir=args.data_dir, root=args.results
      )
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    if lines:
      print("\n".join(lines))
    return 0
  if args.report_only and not has_runs(protocol, seeds, args.results):
    where = runs.shown(args.results / "runs" / protocol.setting)
    print(f"error: no runs of {protocol.name} to report (none in {where}/)", file=sys.stderr)
    return 2
  if not args.report_only:
    from examples import cli

    cli.configure_xla([])
    try:
      runs.run_grid(
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
