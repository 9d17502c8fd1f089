"""Reruns the committed quickstart command and compares every committed number but the seconds.

  python -m benchmarks.check_quickstart [--committed examples/results/quickstart/results.md]

The command is read from the committed ``results.md`` (its ``Command:`` line), run with ``--out``
pointed at a temporary folder, and the two ``results.md`` files are compared: the description
line (data sizes, batch, epochs, steps, seed, jax version) and every table cell as printed, by
exact string match, except the ``seconds`` column. The ``Machine:`` line is shown, not compared.
Exits 1 listing every cell that differs, 0 when all match.

Exact match is meant: on one machine the quickstart is deterministic (the same command gives the
same digits run after run, on one core or two). On a machine with another vector instruction
set XLA:CPU rounds some float32 operations differently, which can change a printed loss where
training is unstable (SGD-momentum at lr 0.1 before the first decay), so a mismatch on another
machine names both machines.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMITTED = pathlib.Path("examples/results/quickstart/results.md")
IGNORED_COLUMNS = ("seconds",)


def parse(text: str) -> dict[str, str]:
  """The comparable values of a quickstart ``results.md``, keyed by where they stand.

  Keys: ``command``, ``machine``, ``description`` (the line of data sizes and versions) and
  ``ROW / COLUMN`` for each table cell (the row named by its first cell).

  Raises:
    ValueError: if the text has no table or a row's cell count differs from the header's.
  """
  values: dict[str, str] = {}
  header: list[str] | None = None
  for raw in text.splitlines():
    line = raw.strip()
    if not line:
      continue
    if line.startswith("|"):
      cells = [c.strip() for c in line.strip("|").split("|")]
      if header is None:
        header = cells
      elif set("".join(cells)) <= set("-: "):
        continue  # the separator row
      else:
        if len(cells) != len(header):
          raise ValueError(f"row {cells[0]!r} has {len(cells)} cells, the header {len(header)}")
        for column, cell in zip(header[1:], cells[1:], strict=True):
          values[f"{cells[0]} / {column}"] = cell
    elif line.startswith("Command:"):
      values["command"] = line.removeprefix("Command:").strip().strip("`")
    elif line.startswith("Machine:"):
      values["machine"] = line.removeprefix("Machine:").strip().rstrip(".")
    else:
      values["description"] = line
  if header is None:
    raise ValueError("no table")
  return values


def compared_keys(values: dict[str, str]) -> list[str]:
  """The keys of :func:`parse`'s values that are compared: all but command, machine, seconds."""
  return [
    k
    for k in values
    if k not in ("command", "machine") and k.rpartition(" / ")[2] not in IGNORED_COLUMNS
  ]


def compare(committed: dict[str, str], rerun: dict[str, str]) -> list[str]:
  """One line per compared value that differs or is missing on one side."""
  keys = compared_keys(committed)
  keys += [k for k in compared_keys(rerun) if k not in committed]
  missing = "(missing)"
  return [
    f"{key}: committed {committed.get(key, missing)}, rerun {rerun.get(key, missing)}"
    for key in keys
    if committed.get(key) != rerun.get(key)
  ]


def rerun_command(command: str, out: pathlib.Path) -> list[str]:
  """The committed command as an argument list, run by this interpreter, writing to ``out``."""
  args = shlex.split(command)
  if args[:3] == ["python", "-m", "examples.quickstart"]:
    rest = args[3:]
  elif args[:2] == ["python", "examples/quickstart.py"]:
    rest = args[2:]
  else:
    raise ValueError(f"not a quickstart command: {command!r}")
  kept, skip = [], False
  for arg in rest:
    if skip:
      skip = False
    elif arg == "--out":
      skip = True
    elif not arg.startswith("--out="):
      kept.append(arg)
  return [sys.executable, "-m", "examples.quickstart", *kept, "--out", str(out)]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.check_quickstart", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument(
    "--committed",
    type=pathlib.Path,
    default=COMMITTED,
    help=f"the committed results.md (default: {COMMITTED})",
  )
  args = parser.parse_args(argv)
  committed = parse((ROOT / args.committed).read_text())
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "quickstart"
    cmd = rerun_command(committed["command"], out)
    print(f"committed: {committed['command']}\nrerunning: {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    rerun = parse((out / "results.md").read_text())
  differences = compare(committed, rerun)
  checked = len(compared_keys(committed))
  machines = (committed.get("machine", "not recorded"), rerun.get("machine", "not recorded"))
  print(f"\nmachine: committed {machines[0]}; rerun {machines[1]}")
  if differences:
    print(f"{len(differences)} of {checked} committed values differ:")
    print("\n".join(f"  {line}" for line in differences))
    if machines[0] != machines[1]:
      print("the machines differ: XLA:CPU's float32 rounding depends on the instruction set")
    return 1
  print(f"all {checked} committed values match (seconds not compared)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
