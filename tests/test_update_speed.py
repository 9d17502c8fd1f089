"""benchmarks/update_speed.py runs without PyTorch, its PyTorch rows skipped."""

from __future__ import annotations

import pathlib
import subprocess
import sys

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
