"""benchmarks/update_speed.py runs without PyTorch, its PyTorch rows skipped; the compiled step's
counts are those of the HLO that runs."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp

from benchmarks import hlo_counts, speed_report, step_timing

ROOT = pathlib.Path(__file__).resolve().parent.parent

# ``sys.modules["torch"] = None`` makes ``import torch`` fail as if PyTorch were not installed.
WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None
from benchmarks import step_timing, update_speed
assert step_timing.torch is None
with_torch, note = step_timing.torch_rows(no_torch=False)
assert not with_torch and note.startswith("PyTorch rows skipped: torch not installed"), note
rows = step_timing.make_rows(with_torch, (0.0,))
assert rows and all(row.kind != "torch" for row in rows), rows
update_speed.main(["--help"])
"""


def test_help_and_rows_without_torch():
  result = subprocess.run(
    [sys.executable, "-c", WITHOUT_TORCH], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("usage: python -m benchmarks.update_speed")
  assert "--no-torch" in result.stdout


def compiled_rows(names, steps_per_call=1):
  """The rows named, after one untimed-warm-up and one timed round on a two-array tree."""
  bench = step_timing.Bench.build("tiny", {"w": (4, 3), "b": (3,)}, False, steps_per_call)
  rows = step_timing.choose_rows(step_timing.make_rows(False, ()), names)
  step_timing.measure(bench, rows, 1, 1, lambda message: None)
  return bench, rows


def test_the_traced_p_step_counts_every_transcendental_its_compiled_hlo_holds():
  _, (row,) = compiled_rows(["padam p traced"])
  summary = hlo_counts.hlo_summary(row.hlo)
  for kind in hlo_counts.OPS:
    found = len(re.findall(rf"= \S+ {re.escape(kind)}\(", row.hlo))
    assert summary.instructions.get(kind, 0) == found, kind
  # The bias corrections' -expm1(t log b), on scalars; the power of the denominator is a
  # polynomial after an exact range reduction, so no elementwise exp or log remains.
  assert summary.instructions["exponential-minus-one"] == 2
  assert summary.elements["exponential-minus-one"] == 2
  assert summary.elements["sqrt"] >= 15  # sqrt(vhat), once per parameter


def test_a_loop_of_steps_counts_one_step():
  _, (one,) = compiled_rows(["padam p traced"])
  _, (loop,) = compiled_rows(["padam p traced"], steps_per_call=3)
  a, b = hlo_counts.hlo_summary(one.hlo), hlo_counts.hlo_summary(loop.hlo)
  assert (a.instructions, a.elements) == (b.instructions, b.elements)
  assert b.kernels >= a.kernels  # the loop body's kernels, not only the loop


def test_elementwise_exp_and_log_are_counted_per_element():
  def f(x):
    return jnp.exp(x) * jnp.log1p(x) + jnp.expm1(x) / jnp.log(x)

  text = jax.jit(f).lower(jnp.ones(16)).compile().as_text()
  summary = hlo_counts.hlo_summary(text)
  for kind in ("exponential", "log-plus-one", "exponential-minus-one", "log", "divide"):
    assert summary.elements[kind] == 16, (kind, summary)
  table = speed_report.hlo_table(*compiled_rows(["padam p traced"]), param_bytes=60)
  assert "exponential-minus-one" in table[2] and "0.13 (2)" in table[4]


def test_one_round_has_its_time_as_every_quartile():
  from benchmarks import speed_report

  assert speed_report._quartiles([0.5]) == [0.5, 0.5, 0.5]
  assert speed_report._quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == [1.5, 3.0, 4.5]
