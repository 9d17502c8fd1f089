"""A run stopped by SIGTERM inside an epoch, as a user's job would be: how long from the signal to
the exit, and whether ``--resume`` ends as the uninterrupted run.

  python -m benchmarks.signal_stop --data-dir DIR [--out benchmarks/results/signal_stop.md]

Runs the CIFAR-10 trainer three times as subprocesses, with the same flags (ResNet-8, batch 32,
4,096 training and 1,000 test images, 2 epochs by default): uninterrupted; then again, sent
SIGTERM once its progress bar shows ``--stop-at`` steps of epoch 1; then that run with
``--resume``. Writes the exit statuses, the seconds from the signal to the exit (the checkpoint's
save and read-back included) and the largest relative difference of every metric between the
resumed and the uninterrupted run (timings left out) to a Markdown file.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from benchmarks.speed_report import cpu_model
from examples import metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The progress bar's count of steps, e.g. "| 50/128 [".
BAR = re.compile(rb"\|\s*(\d+)/(\d+) \[")


def trainer_args(args: argparse.Namespace) -> list[str]:
  return [
    *("--model", args.model, "--batch-size", str(args.batch_size)),
    *("--train-size", str(args.train_size), "--test-size", str(args.test_size)),
    *("--epochs", str(args.epochs), "--data-dir", args.data_dir),
  ]


def run(argv: list[str], log: pathlib.Path) -> int:
  with open(log, "wb") as out:
    return subprocess.run(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode


def stopped_run(argv: list[str], log: pathlib.Path, stop_at: int) -> tuple[int, float, int]:
  """Runs ``argv``, sends SIGTERM once its bar shows ``stop_at`` steps or more; returns the exit
  status, the seconds from the signal to the exit and the steps the bar showed then."""
  with open(log, "wb") as out:
    process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    shown = 0
    while shown < stop_at:
      if process.poll() is not None:
        raise SystemExit(f"the run ended before step {stop_at}; see {log}")
      time.sleep(0.05)
      counts = [int(m.group(1)) for m in BAR.finditer(log.read_bytes())]
      shown = max(counts, default=0)
    start = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    status = process.wait()
    return status, time.perf_counter() - start, shown


def largest_differences(got: list[dict], expected: list[dict]) -> dict[str, float]:
  keys = [k for k in expected[0] if "second" not in k]
  return {
    k: max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for a, b in zip(got, expected, strict=True))
    for k in keys
  }


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.signal_stop", description=__doc__)
  parser.add_argument("--data-dir", required=True, help="folder holding cifar10.npz")
  parser.add_argument("--out", default="benchmarks/results/signal_stop.md")
  parser.add_argument("--model", default="resnet8")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--train-size", type=int, default=4096)
  parser.add_argument("--test-size", type=int, default=1000)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--stop-at", type=int, default=50, help="steps of epoch 1 before SIGTERM")
  args = parser.parse_args(argv)
  trainer = [sys.executable, "-m", "examples.cifar10", *trainer_args(args)]
  with tempfile.TemporaryDirectory() as folder:
    full, cut = pathlib.Path(folder, "full"), pathlib.Path(folder, "cut")
    print("uninterrupted run ...", file=sys.stderr)
    full_status = run([*trainer, "--workdir", str(full), "--no-progress"], full.with_suffix(".log"))
    print("run stopped by SIGTERM ...", file=sys.stderr)
    stop_status, seconds, shown = stopped_run(
      [*trainer, "--workdir", str(cut)], cut.with_suffix(".log"), args.stop_at
    )
    (saved,) = (p.name for p in (cut / "checkpoints").iterdir())
    last_line = cut.with_suffix(".log").read_text(errors="replace").strip().splitlines()[-1]
    last_line = last_line.replace(str(cut), "W")
    print("resumed run ...", file=sys.stderr)
    resume = [*trainer, "--workdir", str(cut), "--no-progress", "--resume"]
    resume_status = run(resume, pathlib.Path(folder, "resume.log"))
    differences = largest_differences(metrics.read_metrics(cut), metrics.read_metrics(full))
    resumptions = metrics.read_run(cut)["resumptions"]
  command = "python -m examples.cifar10 " + shlex.join(trainer_args(args)[:-2])
  lines = [
    "# A run stopped by SIGTERM inside an epoch",
    "",
    f"Machine: {cpu_model()}, {os.cpu_count()} cores, one process. Command: "
    "`python -m benchmarks.signal_stop` "
    f"(trainer: `{command} --data-dir DIR --workdir W`).",
    "",
    "| what | value |",
    "|---|---|",
    f"| uninterrupted run: exit status | {full_status} |",
    f"| SIGTERM sent when the progress bar showed | step {shown} of epoch 1 |",
    f"| stopped run: exit status | {stop_status} |",
    f"| seconds from SIGTERM to the exit | {seconds:.2f} |",
    f"| its checkpoint (named by the steps done) | `checkpoints/{saved}/` |",
    f"| resumed run: exit status | {resume_status} |",
    f"| resumed run's `resumptions` in run.json | `{resumptions}` |",
    f"| largest relative difference, resumed vs uninterrupted, over {args.epochs} epochs | "
    f"{max(differences.values()):.3g} |",
    "",
    f"The stopped run's last line: `{last_line}`.",
    "",
  ]
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text("\n".join(lines))
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
