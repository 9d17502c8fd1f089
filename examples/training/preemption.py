"""Stopping on a signal, and saving on a clock: at each step boundary, whether to checkpoint and
whether to stop.

A run stops at the next step boundary after SIGTERM (what Slurm, Kubernetes and preemptible VMs
send before they take the machine) or SIGINT (Ctrl-C), saves a checkpoint that holds its position
inside the epoch, and exits with :data:`examples.cli.EXIT_PREEMPTED`. A second signal while it saves
is reported and ignored; a third ends the process at once (the newest verified checkpoint is
never damaged: Orbax writes a checkpoint under a temporary name and renames it when it is whole).

In a run of several processes the processes agree on the step to stop at through JAX's preemption
sync (``multihost_utils.reached_preemption_sync_point``, fed by the SIGTERM notifier that
``jax.distributed`` installs): a signal to any one process stops all of them at the same step.
SIGINT to a process is passed on to it as SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import jax

from examples import cli
from examples.training import devices

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(cli.RunStopped):
  """The run stopped on a signal after saving a checkpoint; ``--resume`` continues it."""

  exit_status = cli.EXIT_PREEMPTED


def _name(signum: int) -> str:
  return signal.Signals(signum).name


class Stops:
  """Decides at each step boundary whether to save a checkpoint and whether to stop.

  Use it as a context manager around the training: it installs the signal handlers (in the main
  thread; elsewhere it only keeps the clock) and puts the previous ones back.

  Args:
    minutes: save inside an epoch once this many minutes have passed since the last save, or None.
    sync_every: in a run of several processes, the steps between the checks of the clock (each is
      a collective that agrees on it).
    every_call: check the clock after every call instead (calls of several steps).

  Attributes:
    reason: what stopped the run (``"SIGTERM"``, ...), or None.
  """

  def __init__(self, minutes: float | None = None, sync_every: int = 10, every_call: bool = False):
    self.seconds = None if minutes is None else 60.0 * minutes
    self.sync_every = sync_every
    self.every_call = every_call
    self.reason: str | None = None
    self._signals = 0
    self._saving = False
    self._last_save = time.monotonic()
    self._clock_started = False
    self._previous: dict[int, Any] = {}
    self._processes = jax.process_count()

  # ---- the handlers ----

  def __enter__(self) -> Stops:
    if threading.current_thread() is not threading.main_thread():
      return self
    # Several processes: SIGTERM stays with JAX's preemption notifier; SIGINT is passed on to it.
    # A signal the process was started to ignore (SIGINT of a job started with `&` in a script)
    # stays ignored.
    for signum in SIGNALS if self._processes == 1 else (signal.SIGINT,):
      if signal.getsignal(signum) is not signal.SIG_IGN:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info: Any) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    self._signals += 1
    if self._signals == 1:
      if self._processes > 1:
        os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier, which tells every process
      else:
        self.reason = _name(signum)
      _tell(f"{_name(signum)}: stopping at the next step, after saving a checkpoint")
    elif self._signals == 2:
      doing = "saving the checkpoint" if self._saving else "stopping at the next step"
      _tell(f"{_name(signum)} again: still {doing}; a third signal ends the run at once")
    else:
      self.__exit__()
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)

  # ---- the decisions ----

  def check(self, step: int, steps: int = 1) -> tuple[bool, bool]:
    """Whether to save a checkpoint and whether to stop, after the run's ``step``-th step, the
    last of ``steps`` that one call ran.

    Every process of a run calls it after every call, with the same numbers.
    """
    stop = self._stop_requested(range(step - steps + 1, step + 1))
    return stop or self._clock_due(step), stop

  def _stop_requested(self, steps: range) -> bool:
    if self._processes == 1:
      return self.reason is not None
    from jax.experimental import multihost_utils

    # JAX's sync agrees on one step id, and wants to be asked for every one.
    if any([multihost_utils.reached_preemption_sync_point(step) for step in steps]):
      self.reason = self.reason or "a preemption notice"
    return self.reason is not None

  def _clock_due(self, step: int) -> bool:
    if self.seconds is None:
      return False
    if not self._clock_started:
      # The first call compiled the step: the clock starts after it (every process alike).
      self._clock_started = True
      self._last_save = time.monotonic()
      return False
    due = time.monotonic() - self._last_save >= self.seconds
    if self._processes == 1:
      return due
    if step % self.sync_every and not self.every_call:
      return False
    return any(devices.all_processes(due))

  def saving(self) -> _Saving:
    """A context manager around a checkpoint's save: a signal meanwhile is reported as such, and
    the clock starts again when it ends."""
    return _Saving(self)


class _Saving:
  def __init__(self, stops: Stops):
    self._stops = stops

  def __enter__(self) -> None:
    self._stops._saving = True

  def __exit__(self, *exc_info: Any) -> None:
    self._stops._saving = False
    self._stops._last_save = time.monotonic()


def _tell(message: str) -> None:
  # From the process that got the signal, whichever it is.
  prefix = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
  sys.stderr.write(f"\n{prefix}{message}\n")
  sys.stderr.flush()
