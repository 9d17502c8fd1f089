"""Summaries over seeds for the results tables: mean ± sd, and paired differences with a 95%
t-interval."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence

# Two-sided 95% quantiles of Student's t for 1..10 degrees of freedom (past 10, the 10's: wider
# than exact, so an interval is never too narrow).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


@dataclasses.dataclass(frozen=True)
class Stat:
  """A mean over seeds and their standard deviation (None for one seed)."""

  mean: float
  spread: float | None = None

  @classmethod
  def of(cls, values: Sequence[float]) -> Stat:
    if len(values) == 1:
      return cls(values[0])
    return cls(statistics.fmean(values), statistics.stdev(values))

  def format(self, digits: int = 2) -> str:
    """``mean ± sd`` with ``digits`` decimals (the mean alone for one seed)."""
    if not math.isfinite(self.mean):
      return str(self.mean)
    spread = "" if self.spread is None else f" ± {self.spread:.{digits}f}"
    return f"{self.mean:.{digits}f}{spread}"


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[float, float, int] | None:
  """Mean of ``a - b`` over the seeds both have and its 95% t-interval half-width (nan for one
  seed); None when they share no seed."""
  common = sorted(set(a) & set(b))
  if not common:
    return None
  diffs = [a[s] - b[s] for s in common]
  if len(diffs) == 1:
    return diffs[0], math.nan, 1
  t = T_975[min(len(diffs) - 1, len(T_975)) - 1]
  return statistics.fmean(diffs), t * statistics.stdev(diffs) / len(diffs) ** 0.5, len(diffs)
