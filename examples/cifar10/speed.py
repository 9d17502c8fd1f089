"""Training throughput of the CIFAR-10 models, with and without XLA:CPU's XNNPACK kernels.

Each measurement is one run of the trainer itself, in a fresh process (XLA reads its flags at
start-up): ``python -m examples.cifar10 --model M --epochs 1 --train-size STEPS*BATCH ...``; the
figure is that run's ``images_per_second`` (compilation excluded). The 1-minute load average is
recorded before and after each run, since on a shared machine other work slows it down::

  python -m examples.cifar10.speed --models resnet8 resnet20 --steps 20 \\
      --data-dir DIR --out examples/results/cifar10-cpu-speed.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import IO

from examples import metrics, speed


def measure(
  model: str,
  steps: int,
  batch_size: int,
  data_dir: str | None,
  xnnpack: bool,
  optimizer: str,
  *,
  extra_args: Sequence[str] = (),
  timeout: float | None = None,
  stderr: IO[str] | None = None,
) -> dict:
  """Runs the trainer for one epoch of ``steps`` steps in a fresh process; returns its throughput.

  Args:
    model, steps, batch_size, data_dir, optimizer: the run (``data_dir``: the folder of
      ``cifar10.npz``, or None for the trainer's default).
    xnnpack: XNNPACK on (the trainer's default) or off (``--no-xnnpack``).
    extra_args: more trainer flags, e.g. ``("--dtype", "bfloat16")``.
    timeout: seconds after which the trainer is killed (``subprocess.TimeoutExpired``).
    stderr: where the trainer's standard error goes (default: this process's).

  Returns:
    The record: ``images_per_second`` (training only, compilation excluded), ``train_seconds``,
    ``wall_seconds`` (the whole process), ``num_params``, the load averages and the command.
  """
  with tempfile.TemporaryDirectory() as workdir:
    command = [
      sys.executable,
      "-m",
      "examples.cifar10",
      "--model",
      model,
      "--optimizer",
      optimizer,
      "--epochs",
      "1",
      "--batch-size",
      str(batch_size),
      "--train-size",
      str(steps * batch_size),
      "--test-size",
      "100",
      "--workdir",
      workdir,
      "--no-progress",
      *extra_args,
    ]
    if data_dir:
      command += ["--data-dir", data_dir]
    if not xnnpack:
      command.append("--no-xnnpack")
    run = speed.run_trainer(command, timeout=timeout, stderr=stderr)
    (record,) = metrics.read_metrics(workdir)
    info = metrics.read_run(workdir)
  return {
    "model": model,
    "xnnpack": xnnpack,
    "batch_size": batch_size,
    "steps": steps,
    "images_per_second": record["images_per_second"],
    "train_seconds": record["train_seconds"],
    "wall_seconds": run.wall_seconds,
    "num_params": info["num_params"],
    "load_before": run.load_before,
    "load_after": run.load_after,
    "cpus": os.cpu_count(),
    # The record names no folder of the machine that made it.
    "command": " ".join(command[1:]).replace(workdir, "TMP").replace(data_dir or "\0", "DIR"),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m examples.cifar10.speed", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--models", nargs="+", default=["resnet8", "resnet20"])
  parser.add_argument("--steps", type=int, default=20, help="training steps per measurement")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--optimizer", default="padam")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--xnnpack", choices=["both", "on", "off"], default="both")
  parser.add_argument("--out", default=None, help="append one JSON line per measurement here")
  args = parser.parse_args(argv)
  settings = {"both": (False, True), "on": (True,), "off": (False,)}[args.xnnpack]
  print("| model | params | XNNPACK | images/s | load (1 min) before/after |")
  print("|---|---:|---|---:|---|")
  for model in args.models:
    for xnnpack in settings:
      row = measure(model, args.steps, args.batch_size, args.data_dir, xnnpack, args.optimizer)
      print(
        f"| {model} | {row['num_params']:,} | {'on' if xnnpack else 'off'} | {row['images_per_second']:.1f} | "
        f"{row['load_before']:.1f} / {row['load_after']:.1f} |",
        flush=True,
      )
      if args.out:
        with open(args.out, "a") as f:
          f.write(json.dumps(row) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
