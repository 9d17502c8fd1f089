"""What a run shows while it trains: a progress bar over an epoch's steps with the live metrics and
the throughput (tqdm, on the primary process's stderr), and the one line per finished epoch."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

from examples.training import devices


class ProgressBar:
  """A tqdm bar over an epoch's steps with the live metrics and throughput; nothing when disabled.

  Args:
    total: steps in the epoch.
    desc: the bar's label (``epoch 3/200``).
    unit: what the batches hold (``images``), for the throughput.
    start: ``time.perf_counter()`` when the steps began.
    enabled: whether to show a bar at all.
    initial: steps already done (a run resumed inside the epoch).
  """

  def __init__(
    self, total: int, desc: str, unit: str, start: float, enabled: bool, initial: int = 0
  ):
    self._unit = unit
    self._start = start
    self._bar = None
    if enabled:
      from tqdm.auto import tqdm

      self._bar = tqdm(
        total=total,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        leave=True,
        file=sys.stderr,
        initial=initial,
      )

  def show(self, step: int, live: Mapping[str, float], count: float) -> None:
    """Moves the bar to ``step`` with the live metrics and ``count`` examples since ``start``."""
    if self._bar is None:
      return
    rate = count / max(time.perf_counter() - self._start, 1e-9)
    self._bar.set_postfix(
      {**{k: f"{v:.4g}" for k, v in live.items()}, f"{self._unit}/s": f"{rate:.1f}"},
      refresh=False,
    )
    self._bar.update(step - self._bar.n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def epoch_line(epochs: int, record: Mapping[str, Any]) -> str:
  """The line printed for a finished epoch: ``epoch 3/200: lr 0.1, train_loss 0.51, ...``."""
  shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("epoch", "step"))
  return f"epoch {record['epoch']}/{epochs}: {shown}"


def show_epoch(epochs: int, record: Mapping[str, Any]) -> None:
  """Prints :func:`epoch_line` from the primary process."""
  devices.say(epoch_line(epochs, record))
