"""Command-line plumbing shared by the example trainers (``python -m examples.cifar10``, ...).

A trainer's ``__main__`` builds its parser with :func:`add_common_flags`, calls :func:`configure_xla`
before anything computes (XLA reads ``$XLA_FLAGS`` when JAX starts its backend, at the first
computation, not at import), turns the parsed flags into its config with :func:`loop_kwargs`, and runs
its ``train_and_evaluate`` through :func:`run`, which turns expected failures into one-line messages.

This module imports no JAX at import time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

# XNNPACK kernels for XLA:CPU convolutions and matmuls: 1.3x-2x the images/s of a ResNet training
# step on this project's 2-core CPU (see the README); other backends ignore the flag.
XNNPACK_FLAG = "--xla_cpu_use_xnnpack=true"


def configure_xla(argv: Sequence[str] | None = None) -> None:
  """Adds the XLA:CPU fast paths to ``$XLA_FLAGS`` unless ``--no-xnnpack`` is in ``argv``.

  Call before JAX computes anything (importing JAX is fine). A ``--xla_cpu_use_xnnpack`` already in ``$XLA_FLAGS`` wins.
  """
  argv = sys.argv[1:] if argv is None else argv
  flags = os.environ.get("XLA_FLAGS", "")
  if "--no-xnnpack" in argv or "--xla_cpu_use_xnnpack" in flags:
    return
  os.environ["XLA_FLAGS"] = f"{flags} {XNNPACK_FLAG}".strip()


def parse_hparam(text: str) -> tuple[str, Any]:
  """``"p=0.25"`` -> ``("p", 0.25)``: the value is read as JSON when it is valid JSON, else a string."""
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
  try:
    return key, json.loads(value)
  except json.JSONDecodeError:
    return key, value


def add_common_flags(
  parser: argparse.ArgumentParser, *, optimizers: Sequence[str], epochs: int, batch_size: int
) -> None:
  """Adds the flags every trainer shares (those of ``examples.training.LoopConfig``, and more)."""
  group = parser.add_argument_group("training (shared by every trainer)")
  group.add_argument(
    "--optimizer",
    default="padam",
    choices=optimizers,
    metavar="OPT",
    help=f"optimizer from the registry: {', '.join(optimizers)} (default: %(default)s)",
  )
  group.add_argument(
    "--epochs",
    type=int,
    default=epochs,
    help="total epochs; the learning rate is x0.1 after 50%% and 75%% of them (default: %(default)s)",
  )
  group.add_argument(
    "--batch-size",
    type=int,
    default=batch_size,
    help="global batch, split over the devices (default: %(default)s)",
  )
  group.add_argument(
    "--lr",
    type=float,
    default=None,
    help="base learning rate replacing the paper's value for this optimizer",
  )
  group.add_argument(
    "--hparam",
    action="append",
    type=parse_hparam,
    default=[],
    metavar="KEY=VALUE",
    help="another optimizer hyperparameter replacing the paper's, e.g. p=0.25 or weight_decay=1e-4 (repeatable)",
  )
  group.add_argument(
    "--data-dir",
    default=None,
    help="folder holding the dataset files (default: $PADAM_DATA_DIR, else download to the cache)",
  )
  group.add_argument(
    "--workdir", required=True, help="folder for metrics.jsonl, run.json and checkpoints/"
  )
  group.add_argument(
    "--seed",
    type=int,
    default=0,
    help="seed for initialization, data order and augmentation (default: %(default)s)",
  )
  group.add_argument(
    "--resume",
    action="store_true",
    help="continue from the latest checkpoint in --workdir (starts fresh if there is none)",
  )
  group.add_argument(
    "--devices",
    type=int,
    default=None,
    help="number of devices to split the batch over (default: all)",
  )
  group.add_argument(
    "--no-progress",
    action="store_true",
    help="no progress bar (one line per epoch is still printed)",
  )
  group.add_argument(
    "--no-xnnpack",
    action="store_true",
    help=f"do not add {XNNPACK_FLAG} to $XLA_FLAGS (XLA:CPU only)",
  )
  group.add_argument(
    "--distributed",
    action="store_true",
    help="call jax.distributed.initialize() first (multi-host launch)",
  )


def loop_kwargs(args: argparse.Namespace) -> dict[str, Any]:
  """The ``LoopConfig`` fields from flags added by :func:`add_common_flags`."""
  return {
    "optimizer": args.optimizer,
    "epochs": args.epochs,
    "batch_size": args.batch_size,
    "workdir": args.workdir,
    "seed": args.seed,
    "resume": args.resume,
    "learning_rate": args.lr,
    "hparams": dict(args.hparam),
    "devices": args.devices,
    "progress": not args.no_progress,
  }


def run(
  main: Callable[[], Any], args: argparse.Namespace, expected: tuple[type[BaseException], ...] = ()
) -> int:
  """Runs ``main()``; a bad setting, missing data or a non-finite loss exits with a message, not a traceback.

  Args:
    main: the trainer's work.
    args: the parsed flags (for ``--distributed``).
    expected: further exception types to report as one line (e.g. the trainer's data error).

  Returns:
    The process exit status: 0, 1 for a non-finite loss, 2 for bad settings or data.
  """
  import jax

  from examples import training

  if args.distributed:
    jax.distributed.initialize()
  try:
    main()
  except training.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except (ValueError, *expected) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
