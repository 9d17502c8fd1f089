"""Training throughput of the PTB language models, with and without XLA:CPU's XNNPACK kernels.

Each measurement is one run of the trainer itself, in a fresh process (XLA reads its flags at
start-up): ``python -m examples.ptb --model M --epochs 1 --train-tokens N ...`` with ``N`` the tokens
of ``--steps`` windows; the figure is that run's ``tokens_per_second`` (training only, compilation
excluded). To keep each run short, its validation and test files are the first ``--eval-lines``
lines of the real ones (same vocabulary, from the whole training file). The 1-minute load average is
recorded before and after each run, since on a shared machine other work slows it down::

  python -m examples.ptb.speed --models lstm2-small lstm2-medium --steps 30 \\
      --data-dir DIR --out examples/results/ptb-cpu-speed.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
from collections.abc import Sequence
from typing import IO

from examples import metrics, speed
from examples.ptb import input_pipeline, models


def _short_eval_copy(data_dir: pathlib.Path, folder: pathlib.Path, lines: int) -> None:
  (folder / "ptb.train.txt").symlink_to((data_dir / "ptb.train.txt").absolute())
  for split in ("valid", "test"):
    text = (data_dir / f"ptb.{split}.txt").read_text().splitlines(keepends=True)
    (folder / f"ptb.{split}.txt").write_text("".join(text[:lines]))


def measure(
  model: str,
  steps: int,
  batch_size: int,
  data_dir: pathlib.Path,
  xnnpack: bool,
  optimizer: str,
  eval_lines: int,
  *,
  extra_args: Sequence[str] = (),
  timeout: float | None = None,
  stderr: IO[str] | None = None,
) -> dict:
  """Runs the trainer for one epoch of ``steps`` windows in a fresh process; returns its throughput.

  Args:
    model, steps, batch_size, optimizer: the run.
    data_dir: the folder of the real PTB files; the run's valid and test files are their first
      ``eval_lines`` lines.
    xnnpack: XNNPACK on (the trainer's default) or off (``--no-xnnpack``).
    eval_lines: lines of the valid and test files kept.
    extra_args: more trainer flags, e.g. ``("--dtype", "bfloat16")``.
    timeout: seconds after which the trainer is killed (``subprocess.TimeoutExpired``).
    stderr: where the trainer's standard error goes (default: this process's).

  Returns:
    The record: ``tokens_per_second`` (training only, compilation excluded), ``train_seconds``,
    ``wall_seconds`` (the whole process), ``num_params``, the load averages and the command.
  """
  bptt = models.MODELS[model].bptt
  with tempfile.TemporaryDirectory() as tmp:
    data, workdir = pathlib.Path(tmp) / "data", pathlib.Path(tmp) / "run"
    data.mkdir()
    _short_eval_copy(data_dir, data, eval_lines)
    command = [
      sys.executable,
      "-m",
      "examples.ptb",
      "--model",
      model,
      "--optimizer",
      optimizer,
      "--epochs",
      "1",
      "--batch-size",
      str(batch_size),
      "--train-tokens",
      str(steps * batch_size * bptt + 1),
      "--data-dir",
      str(data),
      "--workdir",
      str(workdir),
      "--no-progress",
      *extra_args,
    ]
    if not xnnpack:
      command.append("--no-xnnpack")
    run = speed.run_trainer(command, timeout=timeout, stderr=stderr)
    (record,) = metrics.read_metrics(workdir)
    info = metrics.read_run(workdir)
    shown = " ".join(command[1:]).replace(str(data), "DATA").replace(str(workdir), "TMP")
  return {
    "model": model,
    "xnnpack": xnnpack,
    "batch_size": batch_size,
    "bptt": bptt,
    "steps": record["step"],
    "tokens_per_second": record["tokens_per_second"],
    "train_seconds": record["train_seconds"],
    "wall_seconds": run.wall_seconds,
    "num_params": info["num_params"],
    "load_before": run.load_before,
    "load_after": run.load_after,
    "cpus": os.cpu_count(),
    "command": shown,
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m examples.ptb.speed", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--models", nargs="+", default=["lstm2-small"])
  parser.add_argument("--steps", type=int, default=30, help="training steps per measurement")
  parser.add_argument("--batch-size", type=int, default=20)
  parser.add_argument("--optimizer", default="padam")
  parser.add_argument("--data-dir", default=None, help="folder of the real PTB files")
  parser.add_argument("--eval-lines", type=int, default=50, help="lines of valid/test to keep")
  parser.add_argument("--xnnpack", choices=["both", "on", "off"], default="both")
  parser.add_argument("--out", default=None, help="append one JSON line per measurement here")
  args = parser.parse_args(argv)
  data_dir = input_pipeline.resolve_data_dir(args.data_dir)
  settings = {"both": (False, True), "on": (True,), "off": (False,)}[args.xnnpack]
  print("| model | params | XNNPACK | tokens/s | load (1 min) before/after |")
  print("|---|---:|---|---:|---|")
  for model in args.models:
    for xnnpack in settings:
      row = measure(
        model, args.steps, args.batch_size, data_dir, xnnpack, args.optimizer, args.eval_lines
      )
      print(
        f"| {model} | {row['num_params']:,} | {'on' if xnnpack else 'off'} | "
        f"{row['tokens_per_second']:.0f} | {row['load_before']:.1f} / {row['load_after']:.1f} |",
        flush=True,
      )
      if args.out:
        with open(args.out, "a") as f:
          f.write(json.dumps(row) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
