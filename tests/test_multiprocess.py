"""The trainers as several cooperating processes (``jax.distributed``), and with sharded state.

Real processes: two of 4 host CPU devices each join through a coordinator on a free localhost port
(Gloo collectives between them) and share one workdir. They train the CIFAR-10 trainer with its
large arrays split over all 8 devices (``--mesh fsdp=8``: half of each on either process), are
killed (SIGKILL) while the second epoch starts, and resume from the checkpoint they wrote together;
and they train the PTB trainer, the batch rows and the carried LSTM state split over them. Their
metrics must equal those of one process of 8 devices. That process also runs CIFAR-10 on
``--mesh data=2,fsdp=4`` against one device (FSDP on its own), and its run.json shows the
optimizer state split four ways.

Every run is a subprocess with its own device count and the test session's other XLA flags
(backend optimizations off, as compiling is what these tiny runs would spend their time on).

This file is also the worker the tests start: ``python tests/test_multiprocess.py TASK ARGS...``
runs ``python -m examples.TASK ARGS...`` with the tests' small models registered (``--then ARGS``
runs another command line of the same trainer in the same process); with ``$HOLD_AFTER_EPOCH`` set
to E, it waits (to be killed) instead of training epoch E + 1.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from examples import cli, metrics
from examples.cifar10 import models as cifar_models
from examples.ptb import models as ptb_models
from examples.training import loop
from examples.training.steps import Steps

ROOT = pathlib.Path(__file__).resolve().parent.parent
HOLD = "HOLD_AFTER_EPOCH"
SIGNAL = "SIGTERM_AT_STEP"
# Ample for a start (imports, compiling) on a busy 2-core machine; a hung run fails, it does not stall.
TIMEOUT = 300
TIMING = {
  "epoch_seconds",
  "train_seconds",
  "eval_seconds",
  "images_per_second",
  "tokens_per_second",
}


class WideNet(nnx.Module):
  """A CIFAR-10 model that compiles in a second and whose parameters are nearly all one large
  matrix (3072 x 16, split under fsdp), with BatchNorm statistics as the real models have."""

  def __init__(self, rngs, dtype=None):
    del dtype  # float32 only
    self.norm = nnx.BatchNorm(3, rngs=rngs)
    self.hidden = nnx.Linear(32 * 32 * 3, 16, rngs=rngs)
    self.out = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    h = self.norm(x).reshape(x.shape[0], -1)
    return self.out(nnx.relu(self.hidden(h)))


# A PTB model small enough to compile in a second or two.
SMALL_LSTM = ptb_models.ModelSpec(embed_size=12, hidden_sizes=(16,), init_scale=0.3, bptt=5)
MODELS = {"cifar10": ("wide", WideNet), "ptb": ("small-lstm", SMALL_LSTM)}


def register_models() -> None:
  cifar_models.MODELS.setdefault(*MODELS["cifar10"])
  ptb_models.MODELS.setdefault(*MODELS["ptb"])


def _hold_after(epoch: int) -> None:
  """Makes the run wait, when it would start epoch ``epoch`` + 1, until it is killed (or exit
  with an error after :data:`TIMEOUT` seconds, should nobody kill it)."""
  train_epoch = loop.train_epoch

  def held(ctx, run, number, key):
    if number > epoch:
      time.sleep(TIMEOUT)
      raise SystemExit(f"held after epoch {epoch} for {TIMEOUT} s and not killed")
    return train_epoch(ctx, run, number, key)

  loop.train_epoch = held


def _signal_at(call: int) -> None:
  """Makes this process send itself SIGTERM as its ``call``-th call of train steps starts; from then
  on its calls take 0.1 s more, so that the processes' agreement on where to stop (a fraction of a
  second on the coordination service) lands inside the run."""
  train = Steps.train_chunk
  calls = []

  def train_and_signal(self, *args):
    calls.append(1)
    if len(calls) == call:
      os.kill(os.getpid(), signal.SIGTERM)
    if len(calls) >= call:
      time.sleep(0.1)
    return train(self, *args)

  Steps.train_chunk = train_and_signal


def worker(argv: list[str]) -> int:
  """Runs ``TASK ARGS [--then ARGS]...`` (see the module's docstring); the first failing status."""
  task, *args = argv
  register_models()
  if HOLD in os.environ:
    _hold_after(int(os.environ[HOLD]))
  if SIGNAL in os.environ:
    _signal_at(int(os.environ[SIGNAL]))
  if task == "cifar10":
    from examples.cifar10 import __main__ as main
  else:
    from examples.ptb import __main__ as main
  runs = [[]]
  for arg in args:
    if arg == "--then":
      runs.append([])
    else:
      runs[-1].append(arg)
  for run in runs:
    status = main.main(run)
    if status:
      return status
  return 0


# --- the tests -----------------------------------------------------------------------------------

# optax's step-decay schedule compares a float with the int32 step (see test_training.py).
pytestmark = pytest.mark.standard_promotion

DEVICES = 8


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker_env(devices: int, hold: int | None, signal_at: int | None = None) -> dict[str, str]:
  """This process's environment (its compilation cache included) for a worker of ``devices``."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  env.pop(HOLD, None)
  env.pop(SIGNAL, None)
  if hold is not None:
    env[HOLD] = str(hold)
  if signal_at is not None:
    env[SIGNAL] = str(signal_at)
  return env


class Run:
  """The processes of one run on :data:`DEVICES` devices in all, their output in
  ``folder/NAME-I.log``: one process, or several that share the devices."""

  def __init__(
    self,
    folder: pathlib.Path,
    name: str,
    task: str,
    args: list[str],
    processes: int,
    hold=None,
    signal_at=None,
    hold_last=False,
  ):
    address = f"127.0.0.1:{free_port()}"
    self.logs = [folder / f"{name}-{i}.log" for i in range(processes)]
    self.processes = []
    for i, log in enumerate(self.logs):
      launch = ["--coordinator", address, "--num-processes", str(processes), "--process-id", str(i)]
      with open(log, "w") as out:
        self.processes.append(
          subprocess.Popen(
            [sys.executable, __file__, task, *(launch if processes > 1 else []), *args],
            cwd=ROOT,
            env=worker_env(
              DEVICES // processes,
              hold if not hold_last or i == processes - 1 else None,
              signal_at if i == processes - 1 else None,
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
          )
        )
    self.deadline = time.monotonic() + TIMEOUT

  def output(self) -> str:
    return "\n".join(
      f"--- process {i} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:])
      for i, log in enumerate(self.logs)
    )

  def fail(self, why: str) -> None:
    self.kill()
    pytest.fail(f"{why}\n{self.output()}")

  def wait(self, status: int = 0) -> None:
    """Waits for every process to exit; fails unless each exits with ``status``."""
    for process in self.processes:
      try:
        process.wait(timeout=max(1.0, self.deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        self.fail(f"the run did not finish in {TIMEOUT} s")
    codes = [process.returncode for process in self.processes]
    if any(code != status for code in codes):
      self.fail(f"exit statuses {codes}")

  def wait_for_epochs(self, workdir: pathlib.Path, epochs: int) -> None:
    """Waits until metrics.jsonl records ``epochs`` epochs, the processes still running."""
    path = metrics.metrics_path(workdir)
    while not (path.is_file() and len(path.read_text().splitlines()) >= epochs):
      if any(process.poll() is not None for process in self.processes):
        self.fail(f"a process exited before epoch {epochs} was recorded")
      if time.monotonic() > self.deadline:
        self.fail(f"epoch {epochs} was not recorded in {TIMEOUT} s")
      time.sleep(0.2)

  def kill(self) -> None:
    """SIGKILL to every process still running."""
    for process in self.processes:
      if process.poll() is None:
        process.send_signal(signal.SIGKILL)
      process.wait()


@pytest.fixture
def launch(tmp_path):
  """Starts the runs of a test (``launch(name, task, args, processes=2, hold=None,
  signal_at=None)``: ``signal_at`` sends the last process SIGTERM at that step); kills what is left
  of them when the test ends."""
  runs = []

  def start(name, task, args, processes=2, hold=None, signal_at=None, hold_last=False):
    runs.append(Run(tmp_path, name, task, args, processes, hold, signal_at, hold_last))
    return runs[-1]

  yield start
  for run in runs:
    run.kill()


def max_differences(got, expected) -> dict[str, float]:
  """The largest relative difference of each metric over the epochs (timings left out)."""
  assert [r["epoch"] for r in got] == [r["epoch"] for r in expected]
  keys = sorted(k for k in expected[0] if k not in TIMING)
  assert keys == sorted(k for k in got[0] if k not in TIMING)
  return {
    k: max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for a, b in zip(got, expected, strict=True))
    for k in keys
  }


def flags(**settings) -> list[str]:
  return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


def test_cifar10_sharded_and_in_two_processes_killed_and_resumed_as_one(tmp_path, launch):
  from test_cifar10 import synthetic_cifar

  from benchmarks import state_memory
  from examples import optimizers

  data = tmp_path / "data"
  data.mkdir()
  np.savez(data / "cifar10.npz", **synthetic_cifar(n_train=32, n_test=16))
  args = flags(model="wide", epochs=2, batch_size=16, eval_batch_size=16, data_dir=data)
  args += ["--no-progress", "--no-xnnpack"]
  one, sharded, two = (tmp_path / name for name in ("one", "sharded", "two"))
  # One process of 8 devices: a run on one of them, then one on all as data=2 x fsdp=4.
  on_one = [*args, "--devices", "1", "--workdir", str(one)]
  on_eight = [*args, "--mesh", "data=2,fsdp=4", "--workdir", str(sharded)]
  single = launch("single", "cifar10", [*on_one, "--then", *on_eight], processes=1)
  two_args = [*args, "--mesh", "fsdp=8", "--workdir", str(two)]
  # Process 1 killed while it waits to start epoch 2 (checkpoint 1 is whole, written by both),
  # process 0 waiting for it in epoch 2's first step: it notices within --peer-timeout and exits
  # with its own status, one line, no stack trace.
  first = launch("first", "cifar10", [*two_args, "--peer-timeout", "4"], hold=1, hold_last=True)
  first.wait_for_epochs(two, 1)
  time.sleep(1.0)  # process 0 is inside epoch 2, in a collective with process 1
  first.processes[1].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  first.processes[0].wait(timeout=60)
  noticed = time.monotonic() - killed
  print(f"process 0 exited {noticed:.1f} s after process 1 was killed (--peer-timeout 4)")
  assert first.processes[0].returncode == cli.EXIT_PEER_LOST == 5, first.output()
  assert noticed < 4 + 3, noticed
  log = first.logs[0].read_text()
  assert "process 1 of this 2-process run is lost: no heartbeat for 4 s" in log, log[-2000:]
  assert "--resume" in log and "Terminating process" not in log and "Traceback" not in log
  assert sorted(os.listdir(two / "checkpoints")) == ["2"]  # named by its steps: 2 an epoch
  resumed = launch("resumed", "cifar10", [*two_args, "--resume"])
  single.wait()
  resumed.wait()

  # FSDP in one process: data=2 x fsdp=4 trains as one device does, a quarter of the state each.
  differences = max_differences(metrics.read_metrics(sharded), metrics.read_metrics(one))
  print(f"cifar10, data=2,fsdp=4 vs 1 device, largest relative differences: {differences}")
  assert max(differences.values()) < 1e-5, differences
  run = metrics.read_run(sharded)
  ratio = run["optimizer_state_bytes_per_device"] / run["optimizer_state_bytes"]
  print(f"optimizer state per device / whole: {ratio:.4f} ({run['optimizer_state_bytes']} B)")
  assert run["mesh"] == {"data": 2, "fsdp": 4} and 0.25 <= ratio < 0.3
  assert run["param_bytes_per_device"] < 0.3 * run["param_bytes"]
  # The memory table of docs/scaling.md computes these bytes from shapes: the same numbers.
  tx = optimizers.make_optimizer("padam", task="cifar10", steps_per_epoch=2, epochs=2).tx
  planned = state_memory.memory(*state_memory.nnx_state(lambda: WideNet(nnx.Rngs(0)), tx), 4)
  assert planned == {k: run[k] for k in planned}

  # Two processes, killed and resumed, as one process of 8 devices.
  differences = max_differences(metrics.read_metrics(two), metrics.read_metrics(sharded))
  print(f"cifar10, 2 processes (fsdp=8, killed, resumed) vs 1: {differences}")
  assert max(differences.values()) < 1e-5, differences
  run = metrics.read_run(two)
  assert run["process_count"] == 2 and run["mesh"] == {"data": 1, "fsdp": 8}
  assert run["resumptions"] == [{"after_epoch": 1, "changed": {}}]
  assert run["optimizer_state_bytes_per_device"] < 0.15 * run["optimizer_state_bytes"]
  # The primary process alone writes and prints: one epoch line, one "Resumed" in both logs.
  output = "".join(log.read_text() for log in resumed.logs)
  assert output.count("epoch 2/2:") == 1 and output.count("Resumed") == 1, resumed.output()


def test_two_processes_train_ptb_as_one_and_stop_together_on_a_signal_to_one(tmp_path, launch):
  from test_ptb import PATTERN, write_corpus

  data = write_corpus(tmp_path / "data", PATTERN * 90, PATTERN * 3, PATTERN * 2)
  args = flags(model="small-lstm", optimizer="sgdm", epochs=2, batch_size=8, eval_batch_size=8)
  args += ["--data-dir", str(data), "--no-progress", "--no-xnnpack"]
  one = launch("one", "ptb", [*args, "--workdir", str(tmp_path / "one")], processes=1)
  two = launch("two", "ptb", [*args, "--workdir", str(tmp_path / "two")])
  # SIGTERM to process 1 alone, at its 4th step (a step a call): both stop at one step, save,
  # exit with 4; the other runs take the default calls (a whole epoch each), with the same numbers.
  stopped_args = [*args, "--workdir", str(tmp_path / "stopped"), "--steps-per-call", "1"]
  stopped = launch("stopped", "ptb", stopped_args, signal_at=4)
  one.wait()
  two.wait()
  stopped.wait(status=4)
  differences = max_differences(
    metrics.read_metrics(tmp_path / "two"), metrics.read_metrics(tmp_path / "one")
  )
  print(f"ptb, 2 processes vs 1: {differences}")
  assert max(differences.values()) < 1e-5, differences
  assert metrics.read_run(tmp_path / "two")["mesh"] == {"data": 8, "fsdp": 1}

  output = stopped.output()
  assert output.count("stopped by a preemption notice at step") == 2 and "--resume" in output, (
    output
  )
  (checkpoint,) = os.listdir(tmp_path / "stopped" / "checkpoints")
  steps = metrics.read_metrics(tmp_path / "two")[0]["step"]
  print(f"stopped after step {checkpoint} (signal at step 4; {steps} steps an epoch)")
  assert 4 <= int(checkpoint) < 2 * steps, checkpoint
  resumed = launch("resumed", "ptb", [*args, "--workdir", str(tmp_path / "stopped"), "--resume"])
  resumed.wait()
  differences = max_differences(
    metrics.read_metrics(tmp_path / "stopped"), metrics.read_metrics(tmp_path / "two")
  )
  print(f"ptb, 2 processes stopped by a signal and resumed vs uninterrupted: {differences}")
  assert max(differences.values()) < 1e-6, differences


if __name__ == "__main__":
  sys.exit(worker(sys.argv[1:]))
