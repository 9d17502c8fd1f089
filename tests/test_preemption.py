"""A run stopped by a signal: it saves where it stands inside the epoch, exits with its own status,
and ``--resume`` ends as the uninterrupted run; saving on a clock; the workdir's lock.

The signals are real (``os.kill`` of this process), sent from inside the data pipeline or a step so
that they land at a known step.
"""

import dataclasses
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from test_cifar10 import TinyNet, synthetic_cifar
from test_ptb import PATTERN, TEST_SPECS, write_corpus
from test_training import ToyTask, config

from examples import cli, metrics, training
from examples.cifar10 import __main__ as cifar10_main
from examples.cifar10 import input_pipeline
from examples.cifar10 import models as cifar_models
from examples.ptb import __main__ as ptb_main
from examples.ptb import models as ptb_models
from examples.training import records
from examples.training.checkpoints import Checkpoints
from examples.training.steps import Steps

# optax's step-decay schedule compares a float with the int32 step (see test_training.py).
pytestmark = pytest.mark.standard_promotion

RTOL = 1e-6


@pytest.fixture(autouse=True)
def _ctrl_c_on():
  """SIGINT as an interactive Python has it, whatever this process was started with (a test run
  started in the background of a script ignores it, and the trainers then leave it ignored)."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)


TIMING = {"epoch_seconds", "train_seconds", "eval_seconds"}


def without_timing(history):
  return [
    {k: v for k, v in r.items() if k not in TIMING and "per_second" not in k} for r in history
  ]


def assert_same_metrics(got, expected):
  """Every metric but the timings equal to ``RTOL`` (relative), epoch by epoch."""
  got, expected = without_timing(got), without_timing(expected)
  assert [r["epoch"] for r in got] == [r["epoch"] for r in expected]
  for a, b in zip(got, expected, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=RTOL, err_msg=key)


class SignalTask(ToyTask):
  """The toy task that sends this process ``signum`` just before it yields batch ``step``
  (0-based) of ``epoch``, or raises ``crash`` there."""

  def __init__(self, epoch, step, signum=signal.SIGTERM, crash=None):
    super().__init__()
    self.at, self.signum, self.crash = (epoch, step), signum, crash

  def train_batches(self, epoch, rng, start=0):
    for step, batch in enumerate(super().train_batches(epoch, rng, start), start):
      if (epoch, step) == self.at:
        if self.crash:
          raise self.crash
        os.kill(os.getpid(), self.signum)
      yield batch


@pytest.fixture(scope="module")
def full(tmp_path_factory):
  """The uninterrupted run: 2 epochs of 4 steps on one device."""
  with pytest.MonkeyPatch.context():
    return training.train(ToyTask(), config(tmp_path_factory.mktemp("full"), devices=1))


@pytest.mark.parametrize(
  "signum, epoch, step, saved",
  [
    # Inside epoch 2: after its step 2 (the signal lands while step 2's batch is made).
    (signal.SIGTERM, 2, 1, ["4", "6"]),
    (signal.SIGINT, 2, 1, ["4", "6"]),
    # On the last step of epoch 1: the epoch ends (evaluated, recorded, checkpointed), then stops.
    (signal.SIGTERM, 1, 3, ["4"]),
  ],
)
def test_a_signal_stops_the_run_and_resume_ends_as_uninterrupted(
  tmp_path, capsys, full, signum, epoch, step, saved
):
  cfg = config(tmp_path, devices=1)
  with pytest.raises(training.Preempted) as stop:
    training.train(SignalTask(epoch, step, signum), cfg)
  assert stop.value.exit_status == cli.EXIT_PREEMPTED == 4
  message = str(stop.value)
  assert message.startswith(f"stopped by {signal.Signals(signum).name} ") and "--resume" in message
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back
  checkpoints = tmp_path / "run" / "checkpoints"
  assert sorted(os.listdir(checkpoints)) == saved
  # metrics.jsonl holds finished epochs only; a stop on a signal is not a stop for good.
  assert [r["epoch"] for r in metrics.read_metrics(cfg.workdir)] == [1]
  assert metrics.read_stopped(cfg.workdir) is None
  (checkpoints / "99.orbax-checkpoint-tmp-1").mkdir()  # what a save killed midway leaves
  capsys.readouterr()
  resumed = training.train(ToyTask(), dataclasses.replace(cfg, resume=True))
  assert "Resumed" in capsys.readouterr().err
  assert_same_metrics(resumed, full)
  assert_same_metrics(metrics.read_metrics(cfg.workdir), full)
  assert not any("tmp" in name for name in os.listdir(checkpoints))
  inside = {"steps_into_epoch": 2} if len(saved) == 2 else {}
  expected = [{"after_epoch": 1, **inside, "changed": {}}]
  assert metrics.read_run(cfg.workdir)["resumptions"] == expected


def test_a_second_signal_while_saving_keeps_the_checkpoint(tmp_path, capsys, monkeypatch, full):
  save = Checkpoints.save
  sent = []

  def save_with_a_signal(self, step, *args, **kwargs):
    if step == 7 and not sent:  # the save of the stop, after 3 steps of epoch 2
      sent.append(True)
      os.kill(os.getpid(), signal.SIGINT)
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(Checkpoints, "save", save_with_a_signal)
  cfg = config(tmp_path, devices=1)
  with pytest.raises(training.Preempted):
    training.train(SignalTask(2, 2, signal.SIGTERM), cfg)
  assert "SIGINT again: still saving the checkpoint" in capsys.readouterr().err
  assert sent
  monkeypatch.setattr(Checkpoints, "save", save)
  resumed = training.train(ToyTask(), dataclasses.replace(cfg, resume=True))
  assert_same_metrics(resumed, full)
  assert metrics.read_run(cfg.workdir)["resumptions"][0]["steps_into_epoch"] == 3


def test_the_clock_saves_inside_epochs_and_a_crash_resumes_from_there(tmp_path, full):
  # A save after every step (the clock is always due); a crash before step 3 of epoch 2.
  cfg = config(tmp_path, devices=1, checkpoint_every_minutes=1e-9)
  with pytest.raises(RuntimeError, match="crash"):
    training.train(SignalTask(2, 3, crash=RuntimeError("crash")), cfg)
  # The two newest: after 2 and 3 steps of epoch 2 (steps 6 and 7 of the run).
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["6", "7"]
  resumed = training.train(ToyTask(), dataclasses.replace(cfg, resume=True))
  assert_same_metrics(resumed, full)


def signal_at_call(monkeypatch, call, signum):
  """Makes the trainers' calls of steps send ``signum`` to this process as the ``call``-th starts."""
  train = Steps.train_chunk
  calls = []

  def train_and_signal(self, *args):
    calls.append(1)
    if len(calls) == call:
      os.kill(os.getpid(), signum)
    return train(self, *args)

  monkeypatch.setattr(Steps, "train_chunk", train_and_signal)
  return lambda: monkeypatch.setattr(Steps, "train_chunk", train)


def _stopped_line(capsys, name):
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith(f"stopped by {name} ") and "--resume" in err[-1], err
  assert not any("Traceback" in line for line in err), err


@pytest.mark.parametrize("trainer", ["cifar10", "ptb"])
def test_both_trainers_stop_on_a_signal_and_resume_exactly(tmp_path, capsys, monkeypatch, trainer):
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # main() may add XNNPACK's
  if trainer == "cifar10":
    monkeypatch.setitem(cifar_models.MODELS, "tiny", TinyNet)
    np.savez(tmp_path / "cifar10.npz", **synthetic_cifar(n_train=32, n_test=10))
    main, name, args = cifar10_main.main, "SIGTERM", ["--model", "tiny", "--batch-size", "8"]
    args += ["--eval-batch-size", "10"]
  else:  # the LSTM's carried state must come back with the checkpoint
    for model, spec in TEST_SPECS.items():
      monkeypatch.setitem(ptb_models.MODELS, model, spec)
    write_corpus(tmp_path, PATTERN * 12, PATTERN * 2, PATTERN * 2)
    main, name, args = ptb_main.main, "SIGINT", ["--model", "test-dropout", "--batch-size", "2"]
    args += ["--eval-batch-size", "2", "--optimizer", "padam", "--lr", "0.1"]
  args += ["--epochs", "2", "--devices", "1", "--no-progress", "--no-xnnpack"]
  args += ["--data-dir", str(tmp_path), "--steps-per-call", "2"]
  assert main([*args, "--workdir", str(tmp_path / "full")]) == cli.EXIT_OK
  steps = metrics.read_metrics(tmp_path / "full")[0]["step"]
  assert steps % 2 == 0, steps
  # Calls of 2 steps: the signal lands in the first call of epoch 2, which stops after it.
  restore = signal_at_call(monkeypatch, steps // 2 + 1, getattr(signal, name))
  capsys.readouterr()
  assert main([*args, "--workdir", str(tmp_path / "run")]) == cli.EXIT_PREEMPTED
  _stopped_line(capsys, name)
  restore()
  assert main([*args, "--workdir", str(tmp_path / "run"), "--resume"]) == cli.EXIT_OK
  full = metrics.read_metrics(tmp_path / "full")
  assert_same_metrics(metrics.read_metrics(tmp_path / "run"), full)
  resumptions = metrics.read_run(tmp_path / "run")["resumptions"]
  assert resumptions == [{"after_epoch": 1, "steps_into_epoch": 2, "changed": {}}]


def test_a_workdir_in_use_is_refused_and_ctrl_c_before_training_is_one_line(
  tmp_path, capsys, monkeypatch
):
  monkeypatch.setitem(cifar_models.MODELS, "tiny", TinyNet)
  np.savez(tmp_path / "cifar10.npz", **synthetic_cifar(n_train=16, n_test=8))
  args = ["--model", "tiny", "--batch-size", "8", "--eval-batch-size", "8", "--epochs", "1"]
  args += ["--devices", "1", "--no-progress", "--no-xnnpack", "--data-dir", str(tmp_path)]
  args += ["--workdir", str(tmp_path / "run")]
  (tmp_path / "run").mkdir()
  with records.hold_workdir(tmp_path / "run"):
    assert cifar10_main.main(args) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "is in use by another run (process" in err, err
    assert "\n" not in err
  assert not (tmp_path / "run" / "metrics.jsonl").exists()

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(input_pipeline, "load_splits", interrupted)
  assert cifar10_main.main(args) == cli.EXIT_INTERRUPTED == 130
  assert capsys.readouterr().err.strip() == "interrupted before training began; nothing was saved"


def test_a_signal_the_process_ignores_stays_ignored():
  from examples.training.preemption import Stops

  signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for a job started with `&` in a script
  term = signal.getsignal(signal.SIGTERM)
  with Stops():
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) not in (term, signal.SIG_IGN)
  assert signal.getsignal(signal.SIGTERM) is term


# Ctrl-C at five moments of a run's life, in a process of its own (a crash shows only at its end).
INTERRUPT_SCRIPT = """
import os, signal, sys, threading
sys.path.insert(0, "tests")
from test_cifar10 import TinyNet
from examples.cifar10 import __main__ as main, input_pipeline, models
from examples.training import checkpoints, loop, steps, task

models.MODELS["tiny"] = TinyNet
OWNERS = {
  "load": (input_pipeline, "load_splits"),
  "compile": (loop, "make_state"),
  "first step": (steps.Steps, "train_chunk"),
  "save": (checkpoints.Checkpoints, "save"),
  "evaluation": (task.Evaluator, "run"),
}
owner, name = OWNERS[sys.argv[1]]
original, fired = getattr(owner, name), []


def interrupted(*args, **kwargs):
  if not fired:  # the first time only; during a compile, from another thread while it runs
    fired.append(1)
    threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGINT)).start()
  return original(*args, **kwargs)


setattr(owner, name, interrupted)
signal.signal(signal.SIGINT, signal.default_int_handler)  # not ignored, whatever pytest's is
sys.exit(main.main(sys.argv[2:]))
"""


@pytest.mark.parametrize(
  ("point", "status"),
  [("load", 130), ("compile", 130), ("first step", 4), ("save", 4), ("evaluation", 4)],
)
def test_ctrl_c_at_any_moment_ends_with_its_status_and_no_crash(tmp_path, point, status):
  np.savez(tmp_path / "cifar10.npz", **synthetic_cifar(n_train=32, n_test=10))
  args = ["--model", "tiny", "--batch-size", "8", "--eval-batch-size", "10", "--epochs", "2"]
  args += ["--devices", "1", "--no-progress", "--no-xnnpack", "--data-dir", str(tmp_path)]
  args += ["--workdir", str(tmp_path / "run")]
  env = {**os.environ, "PYTHONPATH": os.getcwd()}
  done = subprocess.run(
    [sys.executable, "-c", INTERRUPT_SCRIPT, point, *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  err = done.stderr.strip().splitlines()
  assert done.returncode == status, (done.returncode, err[-5:])
  assert not any("Traceback" in line or "Fatal Python" in line for line in err), err
  if status == 130:
    assert err[-1] == "interrupted before training began; nothing was saved"
  else:
    assert err[-1].startswith("stopped by SIGINT") and "--resume" in err[-1], err
