"""The examples' documented command forms, and a clear line when matplotlib is missing."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# ``sys.modules["matplotlib"] = None`` makes ``import matplotlib`` fail as if it were not installed.
WITHOUT_MATPLOTLIB = (
  "import runpy, sys; sys.modules['matplotlib'] = None; "
  "runpy.run_module({module!r}, run_name='__main__')"
)


def run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
  )


@pytest.mark.parametrize(
  ("command", "prog"),
  [
    (("-m", "examples.quickstart"), "python -m examples.quickstart"),
    (("examples/quickstart.py",), "python -m examples.quickstart"),
    (("-m", "examples.plot"), "python -m examples.plot"),
    (("examples/plot.py",), "python -m examples.plot"),
  ],
  ids=["quickstart-module", "quickstart-script", "plot-module", "plot-script"],
)
def test_module_and_script_forms_both_run(command, prog):
  result = run(*command, "--help")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(f"usage: {prog} ")


@pytest.mark.parametrize(
  ("module", "message"),
  [
    ("examples.quickstart", "the quickstart needs matplotlib"),
    ("examples.plot", "examples.plot needs matplotlib"),
  ],
)
def test_missing_matplotlib_is_one_clear_line(module, message, tmp_path):
  out = tmp_path / "out"
  args = [str(tmp_path), "--out", str(out)] if module == "examples.plot" else ["--out", str(out)]
  result = run("-c", WITHOUT_MATPLOTLIB.format(module=module), *args)
  assert result.returncode == 1
  assert result.stderr.splitlines() == [f'{message}: pip install -e ".[examples]"']
  assert not out.exists()
