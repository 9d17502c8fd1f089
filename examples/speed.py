"""What the trainers' speed measurements share: one trainer run in a fresh process, timed.

``examples/cifar10/speed.py`` and ``examples/ptb/speed.py`` build a trainer's command line and read
its ``metrics.jsonl`` back; :func:`run_trainer` runs it in between. This module imports nothing
heavier than the standard library.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from collections.abc import Sequence
from typing import IO


@dataclasses.dataclass(frozen=True)
class TrainerRun:
  """How a trainer's process went.

  Attributes:
    load_before, load_after: the 1-minute load average before and after it.
    wall_seconds: the process's wall time (start-up, data loading and compilation included).
  """

  load_before: float
  load_after: float
  wall_seconds: float


def trainer_env() -> dict[str, str]:
  """This process's environment with no XNNPACK setting in ``$XLA_FLAGS``: the trainer's own
  ``--no-xnnpack`` (or its default, XNNPACK on) decides, whatever the caller's flags say."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "xnnpack" not in f)
  return env


def run_trainer(
  command: Sequence[str],
  *,
  timeout: float | None = None,
  stderr: IO[str] | None = None,
) -> TrainerRun:
  """Runs a trainer's ``command`` to its end, its standard output discarded.

  The environment is this process's, less any XNNPACK flag (:func:`trainer_env`).

  Args:
    command: the full command line (``[python, "-m", "examples.cifar10", ...]``).
    timeout: seconds after which the process is killed (``subprocess.TimeoutExpired``).
    stderr: where its standard error goes (default: this process's).

  Returns:
    The load averages around it and its wall time.

  Raises:
    subprocess.CalledProcessError: when the trainer exits with a non-zero status.
    subprocess.TimeoutExpired: when it runs past ``timeout``.
  """
  load_before = os.getloadavg()[0]
  start = time.perf_counter()
  subprocess.run(
    list(command),
    check=True,
    env=trainer_env(),
    stdout=subprocess.DEVNULL,
    stderr=stderr,
    timeout=timeout,
  )
  return TrainerRun(load_before, os.getloadavg()[0], time.perf_counter() - start)
