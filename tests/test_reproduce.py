"""The reproduction driver: skip finished runs, resume interrupted ones, tables from metrics only
(tests/test_layout.py checks the modules for import circles)."""

import dataclasses

import numpy as np
import pytest
from test_cifar10 import synthetic_cifar
from test_faults import TinyNet

from benchmarks import protocol_report, protocols, reproduce, runs
from examples import metrics
from examples.cifar10 import models

pytestmark = pytest.mark.standard_promotion  # the trainers' schedules (see test_cifar10.py)

TINY = protocols.Protocol(
  name="tiny",
  task="cifar10",
  setting="tiny",
  config=dict(
    model="resnet8_w0.5", train_size=20, test_size=10, batch_size=10, epochs=2, eval_batch_size=10
  ),
  variants=(
    protocols.Variant("sgdm", "sgdm"),
    protocols.Variant("padam p=1/4", "padam", {"p": 0.25}),
  ),
  paper=("paper: ResNet-18", protocols.PAPER_CIFAR10_ACC["resnet18"]),
)


@pytest.fixture
def data_dir(tmp_path):
  folder = tmp_path / "data"
  folder.mkdir()
  np.savez(folder / "cifar10.npz", **synthetic_cifar())
  return str(folder)


def test_grid_resumes_an_interrupted_run_and_skips_a_finished_one(
  tmp_path, data_dir, capsys, monkeypatch
):
  # The grid's bookkeeping does not depend on the network: the smallest model with a CIFAR-10
  # model's state (batch statistics) compiles in a fraction of ResNet-8's time.
  monkeypatch.setitem(models.MODELS, "tiny", TinyNet)
  root = tmp_path / "results"
  one = dataclasses.replace(
    TINY, variants=TINY.variants[:1], config={**TINY.config, "model": "tiny"}
  )
  overrides = {"devices": 1}
  runs.run_grid(
    one,
    seeds=1,
    data_dir=data_dir,
    root=root,
    progress=False,
    overrides={**overrides, "stop_after_epoch": 1},
  )
  assert "running or interrupted (1/2 epochs)" in (root / "tiny" / "table.md").read_text()
  runs.run_grid(one, seeds=1, data_dir=data_dir, root=root, overrides=overrides, progress=False)
  assert "resuming" in capsys.readouterr().out
  assert len(metrics.read_metrics(protocols.run_dir(one, one.variants[0], 0, root))) == 2
  runs.run_grid(one, seeds=1, data_dir=data_dir, root=root, overrides=overrides, progress=False)
  assert "finished, skipped" in capsys.readouterr().out


def fake_history(epochs, final_acc, seed):
  rng = np.random.default_rng(seed)
  return [
    {
      "epoch": e,
      "step": 10 * e,
      "lr": 0.1,
      "train_loss": float(rng.uniform(0.1, 2.0)),
      "train_acc": 0.5,
      "test_loss": 1.0,
      "test_acc": final_acc if e == epochs else float(rng.uniform()),
    }
    for e in range(1, epochs + 1)
  ]


def test_table_and_figure_come_from_the_metrics_files(tmp_path):
  root = tmp_path / "results"
  sgdm, padam = TINY.variants
  for seed, acc in enumerate((0.61, 0.65)):
    workdir = protocols.run_dir(TINY, sgdm, seed, root)
    workdir.mkdir(parents=True)
    metrics.write_metrics(workdir, fake_history(2, acc, seed))
  workdir = protocols.run_dir(TINY, padam, 0, root)
  workdir.mkdir(parents=True)
  metrics.write_metrics(workdir, fake_history(2, 0.7, 5)[:1])  # interrupted after epoch 1

  protocol_report.write_report(TINY, seeds=2, root=root)
  table = (root / "tiny" / "table.md").read_text()
  rows = {
    line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")
  }
  cells = [c.strip() for c in rows["sgdm"].strip("|").split("|")]
  histories = [metrics.read_metrics(protocols.run_dir(TINY, sgdm, s, root)) for s in (0, 1)]
  final = [100 * h[-1]["test_acc"] for h in histories]
  assert (
    cells[1] == f"**{np.mean(final):.2f} ± {np.std(final, ddof=1):.2f}**"
  )  # the only finished row
  losses = [h[-1]["train_loss"] for h in histories]
  assert cells[3] == f"{np.mean(losses):.3f} ± {np.std(losses, ddof=1):.3f}"
  assert cells[5] == "2"
  assert cells[6] == "95.00"  # the paper's ResNet-18 SGD-M number
  assert "running or interrupted (1/2 epochs)" in rows["padam p=1/4"]
  padam_cells = [c.strip() for c in rows["padam p=1/4"].strip("|").split("|")]
  assert padam_cells[6] == ""  # no paper number for a modified optimizer
  assert (root / "tiny" / "figure2_curves.png").stat().st_size > 0


def test_unknown_only_lists_the_valid_labels(tmp_path, data_dir):
  with pytest.raises(ValueError, match="valid: sgdm, padam p=1/4"):
    runs.run_grid(TINY, seeds=1, only=["adam"], data_dir=data_dir, root=tmp_path)


def test_protocols_that_share_a_setting_share_identical_runs():
  mini, sweep = protocols.PROTOCOLS["cifar10-mini"], protocols.PROTOCOLS["psweep-mini"]
  assert mini.setting == sweep.setting and mini.config == sweep.config
  dirs = {protocols.run_dir(mini, v, 0): v for v in mini.variants}
  shared = [
    (dirs[protocols.run_dir(sweep, v, 0)], v)
    for v in sweep.variants
    if protocols.run_dir(sweep, v, 0) in dirs
  ]
  assert sorted(a.optimizer for a, _ in shared) == ["padam", "sgdm"]
  for a, b in shared:  # the same folder only for the same optimizer and hyperparameters
    assert (a.optimizer, dict(a.hparams)) == (b.optimizer, dict(b.hparams))


def test_commands_say_on_standard_error_when_every_run_is_finished(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(protocols.PROTOCOLS, "tiny", TINY)
  argv = ["tiny", "--commands", "--results", str(tmp_path)]
  sgdm, padam = TINY.variants
  workdir = protocols.run_dir(TINY, sgdm, 0, tmp_path)
  workdir.mkdir(parents=True)
  metrics.write_metrics(workdir, fake_history(2, 0.6, 0))
  assert reproduce.main(argv) == 0
  out, err = capsys.readouterr()
  assert len(out.splitlines()) == 1 and "--hparam p=0.25" in out and err == ""
  workdir = protocols.run_dir(TINY, padam, 0, tmp_path)
  workdir.mkdir(parents=True)
  metrics.write_metrics(workdir, fake_history(2, 0.7, 1))
  assert reproduce.main(argv) == 0
  assert capsys.readouterr() == ("", "# every run of tiny is finished\n")
  assert reproduce.main([*argv, "--only", "adam"]) == 2
  assert "matches no run of tiny" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["cifar10-mini", "cifar10-tuned"])
def test_a_report_of_no_run_writes_nothing(tmp_path, capsys, name):
  assert reproduce.main([name, "--report-only", "--results", str(tmp_path)]) == 2
  assert list(tmp_path.iterdir()) == []
  assert f"error: no runs of {name} to report" in capsys.readouterr().err


def test_a_report_of_one_run_is_written(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(protocols.PROTOCOLS, "tiny", TINY)
  workdir = protocols.run_dir(TINY, TINY.variants[1], 0, tmp_path)
  workdir.mkdir(parents=True)
  metrics.write_metrics(workdir, fake_history(2, 0.7, 1)[:1])  # interrupted after epoch 1
  assert reproduce.main(["tiny", "--report-only", "--results", str(tmp_path)]) == 0
  assert "running or interrupted (1/2 epochs)" in capsys.readouterr().out
  assert (tmp_path / "tiny" / "table.md").is_file()
