"""The accelerator kit (benchmarks/accelerator.py) at toy sizes: its files, its budget, its reruns.

The trainer processes of the throughput step are replaced by a stand-in that checks their command
line with the trainer's own parser and writes the metrics a trainer would (a real trainer process
compiles for most of a minute on a small CPU); the update step and the training comparison run
for real, on two-array trees and the smallest CIFAR-10 model.
"""

import json
import pathlib

import numpy as np
import pytest
from test_cifar10 import synthetic_cifar
from test_faults import TinyNet

from benchmarks import accelerator, protocols
from benchmarks.kit import STEPS, UPDATE_ROWS, Kit, Settings, find_data
from examples import speed
from examples.cifar10 import __main__ as cifar_main
from examples.cifar10 import models
from examples.ptb import __main__ as ptb_main

pytestmark = pytest.mark.standard_promotion  # the trainers' schedules (see test_cifar10.py)

PROTOCOL = protocols.Protocol(
  name="kit-test",
  task="cifar10",
  setting="kit-test",
  config=dict(
    model="tiny",
    train_size=20,
    test_size=10,
    batch_size=10,
    epochs=1,
    eval_batch_size=10,
    devices=1,
  ),
  variants=(protocols.Variant("sgdm", "sgdm"), protocols.Variant("padam", "padam")),
)
SETTINGS = Settings(
  trees=(("small", "two arrays", {"conv/kernel": (3, 3, 2, 4), "conv/bias": (4,)}),),
  protocol=PROTOCOL,
  rounds=1,
  calls=2,
  steps_per_call=2,
  cifar_model="resnet8_w0.5",
  cifar_steps=2,
  cifar_batch=10,
  ptb_model="lstm2-tiny",
  ptb_steps=2,
  ptb_batch=2,
  ptb_eval_lines=2,
  tree_seconds=0.0,
  trainer_seconds=0.0,
  margin_seconds=0.0,
)
TEXT = " the cat sat on a mat\n a dog ran\n"


@pytest.fixture
def data(tmp_path, monkeypatch):
  monkeypatch.setitem(models.MODELS, "tiny", TinyNet)
  folder = tmp_path / "data"
  (folder / "ptb").mkdir(parents=True)
  np.savez(folder / "cifar10.npz", **synthetic_cifar(n_train=20, n_test=10))
  for split, repeats in (("train", 40), ("valid", 2), ("test", 2)):
    (folder / "ptb" / f"ptb.{split}.txt").write_text(TEXT * repeats)
  return find_data(str(folder))


@pytest.fixture
def trainers(monkeypatch):
  """Stands in for the trainer processes; returns the command lines it was given."""
  commands = []

  def run_trainer(command, *, timeout=None, stderr=None):
    commands.append(list(command))
    module, argv = command[2], command[3:]
    args = (cifar_main if module == "examples.cifar10" else ptb_main).parse_args(argv)
    assert argv[argv.index("--dtype") + 1] in ("float32", "bfloat16")
    unit = "images" if module == "examples.cifar10" else "tokens"
    record = {"epoch": 1, "step": 2, "train_seconds": 0.5, f"{unit}_per_second": 640.0}
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(exist_ok=True)
    (workdir / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (workdir / "run.json").write_text(json.dumps({"num_params": 1234}))
    return speed.TrainerRun(0.0, 0.0, 1.5)

  monkeypatch.setattr(speed, "run_trainer", run_trainer)
  return commands


def test_help_names_every_option(capsys):
  with pytest.raises(SystemExit) as exit_info:
    accelerator.main(["--help"])
  assert exit_info.value.code == 0
  usage = capsys.readouterr().out
  for option in ("--out", "--data-dir", "--tiny", "--budget-minutes", "--only", "--redo"):
    assert option in usage


def read(out, step):
  return json.loads((out / f"{step}.json").read_text())


def test_kit_writes_each_step_stops_at_its_budget_and_resumes(tmp_path, data, trainers, capsys):
  # No time at all: nothing runs, and the summary says what was not done and why.
  spent = Kit(tmp_path / "spent", SETTINGS, data, budget_seconds=0)
  assert accelerator.run_kit(spent) == 0
  assert not trainers
  statuses = [p["status"] for step in STEPS for p in read(spent.out, step)["parts"]]
  assert statuses.count("not run") == 1 + 4 + 2 and statuses.count("skipped") == 0
  summary = (spent.out / "summary.md").read_text()
  assert "Not done:" in summary and "of the budget left, a call to train one epoch takes" in summary

  kit = Kit(tmp_path / "out", SETTINGS, data, budget_seconds=600)
  assert accelerator.run_kit(kit) == 0
  out = kit.out
  (tree,) = read(out, "update-step")["parts"]
  assert [r["optimizer"] for r in tree["rows"]] == list(UPDATE_ROWS)
  for row in tree["rows"]:
    assert row["median_ms"] > 0 and row["gb_per_s"] > 0 and row["of_peak"] is None  # a CPU
    # XLA's analyses of the compiled call: scratch memory and bytes accessed.
    assert row["temp_bytes"] >= 0 and row["bytes_accessed"] > 0
  floor = tree["rows"][-1]
  assert floor["moved_bytes"] == 9 * tree["param_bytes"] and floor["vs_floor"] == 1.0
  update_table = (out / "update-step.md").read_text()
  assert "| padam p traced |" in update_table
  assert "| state MB | temporaries MB | state + temporaries MB | GB accessed |" in update_table

  rows = {p["key"]: p for p in read(out, "throughput")["parts"]}
  assert rows["cifar10-float32"]["rate"] == rows["ptb-float32"]["rate"] == 640.0
  bf16 = rows["cifar10-bfloat16"]
  assert bf16["status"] == "done" and "--dtype bfloat16" in bf16["command"]
  assert len(trainers) == 4
  assert rows["cifar10-float32-1"]["status"] == "done"
  assert "--steps-per-call 1" in rows["cifar10-float32-1"]["command"]
  assert data.given not in (out / "throughput.json").read_text()  # the data folder shown as DATA

  record = read(out, "gpu-short")
  assert record["status"] == "done"
  assert [p["epochs_done"] for p in record["parts"]] == [1, 1]
  table = (out / "kit-test" / "table.md").read_text()
  assert "| sgdm | **" in table or "| padam | **" in table
  assert (out / "kit-test" / "figure2_curves.png").stat().st_size > 0
  assert (out / "runs" / "kit-test" / "padam-seed0" / "metrics.jsonl").is_file()
  assert not (out / "runs" / "kit-test" / "padam-seed0" / "checkpoints").exists()

  summary = (out / "summary.md").read_text()
  assert kit.device["device_kind"] in summary and f"jax {kit.device['jax']}" in summary
  for step in STEPS:
    assert f"| {step} | done | " in summary

  # A rerun skips every finished step; one whose last row was cut short measures that row only.
  capsys.readouterr()
  assert accelerator.run_kit(kit) == 0
  assert capsys.readouterr().out.count("done in an earlier run, skipped") == 3
  throughput = read(out, "throughput")
  throughput["status"] = "partial"
  throughput["parts"][-1] |= {"status": "not run", "reason": "budget"}
  (out / "throughput.json").write_text(json.dumps(throughput))
  before = len(trainers)
  assert accelerator.run_kit(kit, ["throughput"]) == 0
  assert [c[2] for c in trainers[before:]] == ["examples.ptb"]
  assert read(out, "throughput")["status"] == "done"
