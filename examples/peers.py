"""A lost process of a multi-process run, noticed by the others within seconds.

A process that stops (killed, out of memory, its host lost) leaves the others waiting in a
collective; JAX's distributed service notices it only after its heartbeat timeout (100 s by
default) and then aborts every process (SIGABRT, a C++ stack trace). Instead, once
``jax.distributed.initialize`` has connected, each process beats: it writes a counter to the
service's key-value store every second and reads the others'. When a process's counter has not
moved for ``--peer-timeout`` seconds, or the service itself (it runs in process 0) cannot be
reached, every process that is left prints one line naming the lost process and what to do, and
ends at once with exit status 5. A collective whose peer is gone may fail first (Gloo's "Connection
closed by peer"): :func:`settle` gives the watch the time to name the lost process instead of that
error's traceback. Its checkpoints stay as they were: the newest verified one is the
way on (``--resume`` on every process).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

PREFIX = "padam_jax/heartbeat"
_current: Watch | None = None  # this process's watch, once started


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:200]


class Watch:
  """Beats for this process and watches the others' beats, in a daemon thread.

  Args:
    client: the distributed runtime's client (its key-value store).
    process_id: this process.
    num_processes: every process of the run.
    timeout: seconds without a beat after which a process counts as lost.
    status: the exit status of a process that finds another lost.
    interval: seconds between beats.
  """

  def __init__(
    self,
    client: Any,
    process_id: int,
    num_processes: int,
    timeout: float,
    status: int,
    interval: float = 1.0,
  ):
    self.client = client
    self.process_id = process_id
    self.others = [p for p in range(num_processes) if p != process_id]
    self.num_processes = num_processes
    self.timeout = timeout
    self.status = status
    self.interval = min(interval, timeout / 4)
    self.thread = threading.Thread(target=self._run, name="peer-watch", daemon=True)

  def start(self) -> Watch:
    self.thread.start()
    return self

  def settle(self) -> None:
    """Waits as long as the watch needs to find a lost process (it then ends this one)."""
    time.sleep(self.timeout + 2 * self.interval)

  def _lost(self, what: str) -> None:
    print(
      f"error: {what}; process {self.process_id} stops too. The run's newest verified checkpoint "
      "is kept: start every process again with the same command and --resume",
      file=sys.stderr,
      flush=True,
    )
    os._exit(self.status)

  def _run(self) -> None:
    beat, now = 0, time.monotonic()
    seen = {p: (None, now) for p in self.others}  # the last value read, and when it changed
    while True:
      beat += 1
      try:
        self.client.key_value_set(f"{PREFIX}/{self.process_id}", str(beat), allow_overwrite=True)
        values = dict(self.client.key_value_dir_get(f"{PREFIX}/"))
      except Exception as e:  # the service is gone with process 0, or the network with it
        self._lost(
          f"the coordination service of this {self.num_processes}-process run cannot be reached "
          f"({_first_line(e)}): process 0 is lost"
        )
      now = time.monotonic()
      for p in self.others:
        value = values.get(f"{PREFIX}/{p}", values.get(str(p)))
        if value != seen[p][0]:
          seen[p] = (value, now)
        elif now - seen[p][1] > self.timeout:
          self._lost(
            f"process {p} of this {self.num_processes}-process run is lost: no heartbeat for "
            f"{self.timeout:g} s (killed, out of memory, or its host lost)"
          )
      time.sleep(self.interval)


def watch(timeout: float, status: int) -> Watch | None:
  """Starts the watch of this process after ``jax.distributed.initialize``; None in a run of one
  process, or where the distributed client is not at hand."""
  import jax
  from jax._src import distributed

  global _current
  client = getattr(distributed.global_state, "client", None)
  if client is None or jax.process_count() < 2:
    return None
  _current = Watch(client, jax.process_index(), jax.process_count(), timeout, status).start()
  return _current


def settle() -> None:
  """After an error in a run of several processes, before it is reported: if a process is lost
  (the error may be a collective's that lost its peer), the watch ends this process with its line
  and status within ``timeout`` seconds; else this returns and the error is reported as it is."""
  if _current is not None and _current.thread.is_alive():
    _current.settle()
