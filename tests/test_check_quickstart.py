"""benchmarks/check_quickstart.py: reading and comparing quickstart results (no training run)."""

from __future__ import annotations

import pathlib

import pytest

from benchmarks import check_quickstart

COMMITTED = """Command: `python -m examples.quickstart --out some/dir --epochs 8 --seed 0`

100 training and 20 test images, batch 32, 8 epochs (24 steps), seed 0, jax 0.10.2 on cpu.

Machine: Some CPU (avx2), 2 cores.

| optimizer | train loss, epoch 2 | final train loss | final test accuracy | seconds |
|---|---|---|---|---|
| SGD-momentum | 0.0317 | 0.0045 | 0.9806 | 12.9 |
| Padam (p=1/8) | 0.0348 | 0.0064 | 0.9750 | 11.5 |
"""


def test_parse_reads_every_cell_the_command_and_the_machine():
  values = check_quickstart.parse(COMMITTED)
  assert values["command"] == "python -m examples.quickstart --out some/dir --epochs 8 --seed 0"
  assert values["machine"] == "Some CPU (avx2), 2 cores"
  assert values["description"].startswith("100 training and 20 test images")
  assert values["SGD-momentum / train loss, epoch 2"] == "0.0317"
  assert values["Padam (p=1/8) / final test accuracy"] == "0.9750"
  assert values["Padam (p=1/8) / seconds"] == "11.5"
  assert len(check_quickstart.compared_keys(values)) == 1 + 2 * 3  # description, 2 rows x 3


def test_identical_results_but_seconds_and_machine_match():
  rerun = COMMITTED.replace("12.9", "30.1").replace("Some CPU", "Other CPU")
  assert (
    check_quickstart.compare(check_quickstart.parse(COMMITTED), check_quickstart.parse(rerun)) == []
  )


def test_every_differing_cell_is_listed():
  rerun = COMMITTED.replace("0.0317", "0.0191").replace("0.9750", "0.9722")
  rerun = rerun.replace("jax 0.10.2", "jax 0.11.0")
  differences = check_quickstart.compare(
    check_quickstart.parse(COMMITTED), check_quickstart.parse(rerun)
  )
  assert differences == [
    "description: committed 100 training and 20 test images, batch 32, 8 epochs (24 steps), "
    "seed 0, jax 0.10.2 on cpu., rerun 100 training and 20 test images, batch 32, 8 epochs "
    "(24 steps), seed 0, jax 0.11.0 on cpu.",
    "SGD-momentum / train loss, epoch 2: committed 0.0317, rerun 0.0191",
    "Padam (p=1/8) / final test accuracy: committed 0.9750, rerun 0.9722",
  ]


def test_a_missing_or_extra_row_is_a_difference():
  lines = COMMITTED.splitlines()
  fewer = "\n".join(line for line in lines if not line.startswith("| Padam"))
  differences = check_quickstart.compare(
    check_quickstart.parse(COMMITTED), check_quickstart.parse(fewer)
  )
  assert len(differences) == 3
  assert all(d.startswith("Padam") and d.endswith("rerun (missing)") for d in differences)
  extra = check_quickstart.compare(check_quickstart.parse(fewer), check_quickstart.parse(COMMITTED))
  assert len(extra) == 3 and all("committed (missing)" in d for d in extra)


def test_malformed_tables_are_refused():
  with pytest.raises(ValueError, match="no table"):
    check_quickstart.parse("Command: `python -m examples.quickstart`\n")
  with pytest.raises(ValueError, match="cells"):
    check_quickstart.parse(COMMITTED.replace("| 0.0045 |", "|"))


@pytest.mark.parametrize(
  "command",
  [
    "python -m examples.quickstart --out examples/results/quickstart --epochs 60 --seed 0",
    "python examples/quickstart.py --epochs 60 --out=elsewhere --seed 0",
  ],
)
def test_the_committed_command_is_rerun_into_the_given_folder(command):
  args = check_quickstart.rerun_command(command, pathlib.Path("rerun-out"))
  assert args[1:] == [
    "-m",
    "examples.quickstart",
    "--epochs",
    "60",
    "--seed",
    "0",
    "--out",
    "rerun-out",
  ]
  with pytest.raises(ValueError, match="not a quickstart command"):
    check_quickstart.rerun_command("python -m examples.plot a --out b", pathlib.Path("rerun-out"))
