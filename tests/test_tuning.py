"""Tuned protocols: the grid grows past an edge, the choice, the seeds, the report, the commands."""

import argparse
import json
import math
import shlex
import shutil
import sys

import numpy as np
import pytest

from benchmarks import runs, stats, tuning
from benchmarks.protocols import Protocol, Tuning, Variant
from examples import cli, metrics
from examples.cifar10 import train as cifar10_train

EPOCHS = 3
TUNED = Protocol(
  name="tuned",
  task="cifar10",
  setting="tuned",
  config=dict(model="resnet8", train_size=20, val_size=10, batch_size=10, epochs=EPOCHS),
  variants=(Variant("sgdm", "sgdm"), Variant("padam", "padam")),
  tuning=Tuning(seeds=3),
  compare=(("padam", "sgdm"),),
)
FOLLOW = Protocol(
  name="follow",
  task="cifar10",
  setting="tuned",
  config=TUNED.config,
  variants=(
    Variant("padam", "padam", rate_of=("tuned", "padam")),
    Variant("padam wd x2", "padam", {"weight_decay": 1e-3}, rate_of=("tuned", "padam")),
  ),
  tuning=Tuning(seeds=2),
)
PROTOCOLS = {"tuned": TUNED, "follow": FOLLOW}


@pytest.fixture(autouse=True)
def protocols(monkeypatch):
  monkeypatch.setattr("benchmarks.protocols.PROTOCOLS", PROTOCOLS)


def finish(root, protocol, label, step, seed, val_acc, test_acc=0.5):
  variant = next(v for v in protocol.variants if v.label == label)
  workdir = tuning.run_dir(protocol, variant, step, seed, root)
  workdir.mkdir(parents=True, exist_ok=True)
  records = [
    {"epoch": e, "train_loss": 1.0 / e, **({"val_acc": 0.1} if e < EPOCHS else {})}
    for e in range(1, EPOCHS + 1)
  ]
  records[-1].update(val_acc=val_acc, test_acc=test_acc)
  metrics.write_metrics(workdir, records)
  return workdir


def steps_of(jobs, label):
  return sorted((j.step, j.seed) for j in jobs if j.variant.label == label)


def test_step_tags_and_rates():
  assert [tuning.step_tag(s) for s in (-2, -1, 0, 1, 2)] == ["x1_9", "x1_3", "x1", "x3", "x9"]
  sgdm = TUNED.variants[0]
  assert tuning.learning_rate(TUNED, sgdm, 1) == 0.3  # printed as 0.3, not 0.30000000000000004
  assert tuning.learning_rate(TUNED, sgdm, -1) == pytest.approx(0.1 / 3, rel=1e-6)
  assert tuning.learning_rate(TUNED, Variant("a", "adam"), 0) == 1e-3


def test_the_grid_grows_past_an_edge_then_seeds_run_at_the_choice(tmp_path):
  jobs = tuning.plan(TUNED, PROTOCOLS, tmp_path)
  assert steps_of(jobs, "sgdm") == [(-1, 0), (0, 0), (1, 0)]
  # sgdm: the best at x3 (an edge) -> x9 is tried next; nothing at the choice yet.
  for step, acc in ((-1, 0.40), (0, 0.50), (1, 0.60)):
    finish(tmp_path, TUNED, "sgdm", step, 0, acc)
  assert steps_of(tuning.plan(TUNED, PROTOCOLS, tmp_path), "sgdm") == [(2, 0)]
  # x9 is worse: x3 is chosen, seeds 1 and 2 run there.
  finish(tmp_path, TUNED, "sgdm", 2, 0, 0.55)
  state = tuning.grid(TUNED, TUNED.variants[0], PROTOCOLS, tmp_path)
  assert state.chosen == 1 and state.scores == {-1: 0.40, 0: 0.50, 1: 0.60, 2: 0.55}
  assert steps_of(tuning.plan(TUNED, PROTOCOLS, tmp_path), "sgdm") == [(1, 1), (1, 2)]


def test_the_grid_stops_at_its_reach_and_a_tie_takes_the_smaller_rate(tmp_path):
  # padam: best at x1/3, then at x1/9 (the reach): x1/9 is chosen although it is an edge.
  for step, acc in ((-1, 0.7), (0, 0.5), (1, 0.5), (-2, 0.8)):
    finish(tmp_path, TUNED, "padam", step, 0, acc)
  assert tuning.grid(TUNED, TUNED.variants[1], PROTOCOLS, tmp_path).chosen == -2
  # A tie between x1 and x3 (interior best) picks x1.
  for step, acc in ((-1, 0.2), (0, 0.6), (1, 0.6)):
    finish(tmp_path, TUNED, "sgdm", step, 0, acc)
  assert tuning.grid(TUNED, TUNED.variants[0], PROTOCOLS, tmp_path).chosen == 0
  # The table marks a choice at the limit, and only that one.
  table = dict(
    (line.split(" | ")[0], line) for line in tuning.grid_table(TUNED, PROTOCOLS, tmp_path)[2:]
  )
  assert table["| padam"].endswith("0.0111 (the grid's limit: a rate past it was not tried) |")
  assert table["| sgdm"].endswith("| 0.1 |")


def test_a_non_finite_run_scores_lowest_and_the_variant_waits_for_its_source(tmp_path):
  for step, acc in ((0, 0.6), (1, 0.5)):
    finish(tmp_path, TUNED, "padam", step, 0, acc)
  follow = tuning.grid(FOLLOW, FOLLOW.variants[1], PROTOCOLS, tmp_path)
  assert follow.chosen is None and "waits for the rate chosen for padam in tuned" in follow.waiting
  assert tuning.plan(FOLLOW, PROTOCOLS, tmp_path) == []
  stopped = tuning.run_dir(TUNED, TUNED.variants[1], -1, 0, tmp_path)
  stopped.mkdir(parents=True)
  (stopped / metrics.STOPPED_FILE).write_text(json.dumps({"after_epoch": 1, "reason": "nan"}))
  # x1/3 stopped non-finite (NaN, ranked last), so x1 is an interior best: chosen; the follower runs there.
  assert math.isnan(tuning.grid(TUNED, TUNED.variants[1], PROTOCOLS, tmp_path).scores[-1])
  jobs = tuning.plan(FOLLOW, PROTOCOLS, tmp_path)
  assert steps_of(jobs, "padam") == [(0, 1)]  # seed 0 at x1 is the tuned grid's own run
  assert steps_of(jobs, "padam wd x2") == [(0, 0), (0, 1)]
  assert jobs[-1].workdir.name == "padam-wd-x2-lrx1-seed1"


LM = Protocol(
  name="lm",
  task="ptb",
  setting="lm",
  config=dict(model="lstm2-small", epochs=EPOCHS),
  variants=(Variant("sgdm", "sgdm"), Variant("padam", "padam", seeds=1)),
  tuning=Tuning(seeds=2, select="valid_ppl", lower_is_better=True),
  compare=(("padam", "sgdm"),),
)


def finish_lm(root, label, step, seed, valid_ppl, test_ppl=100.0):
  variant = next(v for v in LM.variants if v.label == label)
  workdir = tuning.run_dir(LM, variant, step, seed, root)
  workdir.mkdir(parents=True, exist_ok=True)
  records = [{"epoch": e, "train_loss": 5.0 / e, "valid_ppl": 500.0} for e in range(1, EPOCHS)]
  records.append({"epoch": EPOCHS, "train_loss": 1.0, "valid_ppl": valid_ppl, "test_ppl": test_ppl})
  metrics.write_metrics(workdir, records)


def test_a_perplexity_grid_picks_the_lowest_and_a_variant_caps_its_seeds(tmp_path):
  # The lowest final valid_ppl wins; a non-finite run ranks last, not first.
  for step, ppl in ((-1, 300.0), (0, 200.0), (1, 250.0)):
    finish_lm(tmp_path, "sgdm", step, 0, ppl, test_ppl=190.0)
  stopped = tuning.run_dir(LM, LM.variants[1], 1, 0, tmp_path)
  stopped.mkdir(parents=True)
  (stopped / metrics.STOPPED_FILE).write_text(json.dumps({"after_epoch": 1, "reason": "nan"}))
  for step, ppl in ((-1, 260.0), (0, 240.0)):
    finish_lm(tmp_path, "padam", step, 0, ppl, test_ppl=230.0)
  assert tuning.grid(LM, LM.variants[0], {"lm": LM}, tmp_path).chosen == 0
  assert tuning.grid(LM, LM.variants[1], {"lm": LM}, tmp_path).chosen == 0
  # sgdm runs its second seed; padam, capped at one seed, runs nothing more.
  assert [(j.variant.label, j.seed) for j in tuning.plan(LM, {"lm": LM}, tmp_path)] == [("sgdm", 1)]
  finish_lm(tmp_path, "sgdm", 0, 1, 210.0, test_ppl=200.0)
  text = tuning.report(LM, {"lm": LM}, tmp_path, seeds=2)
  assert "| variant | rates tried: final valid_ppl (seed 0) | chosen rate |" in text
  assert "0.333: 300.0, **1: 200.0**, 3: 250.0 | 1 |" in text
  assert "0.00333: 260.0, **0.01: 240.0**, 0.03: non-finite | 0.01 |" in text
  assert "| variant | rate | seeds | test perplexity | validation perplexity |" in text
  assert "| sgdm | 1 | 2 | 195.00 ± 7.07 | 205.00 ± 7.07 | 1.000 ± 0.000 |" in text
  assert "| padam | 0.01 | 1 | 230.00 | 240.00 | 1.000 |" in text
  assert "| difference (test perplexity; lower is better) |" in text
  assert "| padam - sgdm | 1 | +40.00 |  |" in text


def test_paired_difference_and_its_interval():
  mean, half, n = stats.paired({0: 60.0, 1: 62.0, 2: 61.0, 3: 1.0}, {0: 59.0, 1: 60.0, 2: 58.0})
  # Differences 1, 2, 3 over the 3 common seeds: mean 2, sd 1, t(0.975, 2 df) = 4.303.
  assert (mean, n) == (2.0, 3)
  assert half == pytest.approx(4.303 / math.sqrt(3), rel=1e-6)
  assert stats.paired({0: 1.0}, {1: 2.0}) is None


def test_the_t_quantiles_are_students():
  # Student's t density integrated numerically from 0 to each tabulated quantile: 0.475.
  for df, q in enumerate(stats.T_975, start=1):
    x = np.linspace(0.0, q, 200_001)
    density = (1 + x**2 / df) ** (-(df + 1) / 2)
    norm = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    assert norm * np.trapezoid(density, x) == pytest.approx(0.475, abs=2e-5), df


def test_the_report_shows_the_grid_the_choice_and_the_paired_difference(tmp_path):
  for label in ("sgdm", "padam"):
    for step, acc in ((-1, 0.4), (0, 0.6), (1, 0.5)):
      finish(tmp_path, TUNED, label, step, 0, acc, test_acc=0.55)
    for seed, test in ((1, 0.57), (2, 0.56)):
      finish(tmp_path, TUNED, label, 0, seed, 0.6, test_acc=test + (label == "padam") * 0.01)
  text = tuning.report(TUNED, PROTOCOLS, tmp_path, seeds=3)
  assert "0.0333: 40.0, **0.1: 60.0**, 0.3: 50.0 | 0.1 |" in text
  assert "| sgdm | 0.1 | 3 | 56.00 ± 1.00 | 60.00 ± 0.00 |" in text
  assert "| padam - sgdm | 3 | +0.67 |" in text


def test_the_grid_figure_has_each_finite_run_of_the_grid_and_the_choice(tmp_path):
  from examples import plot

  for step, acc in ((-1, 0.4), (0, 0.6), (1, 0.5)):
    finish(tmp_path, TUNED, "sgdm", step, 0, acc)
  finish(tmp_path, TUNED, "padam", 0, 0, 0.3)
  stopped = tuning.run_dir(TUNED, TUNED.variants[1], 1, 0, tmp_path)
  stopped.mkdir(parents=True)
  (stopped / metrics.STOPPED_FILE).write_text(json.dumps({"after_epoch": 1, "reason": "nan"}))
  series = tuning.grid_points(TUNED, PROTOCOLS, tmp_path)
  assert series == [
    ("sgdm", [(0.0333333, 0.4), (0.1, 0.6), (0.3, 0.5)], 0.1),
    ("padam", [(0.1, 0.3)], None),  # the non-finite x3 has no point; x1/3 has not run
  ]
  plot.plot_rates(series, str(tmp_path / "grid.png"), "final val_acc")
  assert (tmp_path / "grid.png").stat().st_size > 0


def test_commands_rebuild_each_config(tmp_path):
  lines = runs.commands(TUNED, seeds=3, data_dir="DIR", root=tmp_path)
  assert len(lines) == 6
  words = shlex.split(lines[-1])
  # "python" when that is this interpreter (an active environment), else this interpreter's path.
  assert words[0] in ("python", sys.executable) and words[1:3] == ["-m", "examples.cifar10"]
  parser = argparse.ArgumentParser()
  cli.add_config_flags(parser, cifar10_train.Config)
  args = parser.parse_args(words[3:])
  config = cli.config_from_args(cifar10_train.Config, args)
  assert (config.optimizer, config.learning_rate, config.val_size) == ("padam", 0.3, 10)
  assert config.resume and not config.progress and config.data_dir == "DIR"
  assert config.workdir.endswith("tuned/padam-lrx3-seed0")


def test_config_flags_round_trip():
  config = cifar10_train.Config(
    workdir="w",
    model="resnet8",
    hparams={"p": 0.25, "bias_correction": False},
    resume=True,
    progress=False,
    learning_rate=0.03,
    eval_every=4,
  )
  parser = argparse.ArgumentParser()
  cli.add_config_flags(parser, cifar10_train.Config)
  flags = cli.config_flags(config)
  assert cli.config_from_args(cifar10_train.Config, parser.parse_args(flags)) == config


@pytest.mark.standard_promotion  # the trainers' schedules (see test_cifar10.py)
def test_validation_split_and_evaluation_and_checkpoint_intervals(tmp_path, monkeypatch):
  import numpy as np
  from test_cifar10 import synthetic_cifar
  from test_faults import TinyNet

  from examples.cifar10 import input_pipeline, models

  monkeypatch.setitem(models.MODELS, "tiny", TinyNet)
  (tmp_path / "data").mkdir()
  np.savez(tmp_path / "data" / "cifar10.npz", **synthetic_cifar(n_train=60, n_test=20))
  # The validation split is class-balanced and shares no image with the training subset.
  train, test, val = input_pipeline.load_splits(tmp_path / "data", 20, None, 0, val_size=30)
  assert np.bincount(val.labels).tolist() == [3] * 10 and len(test.labels) == 20
  flat = lambda split: {x.tobytes() for x in split.images}  # noqa: E731
  assert len(train.labels) == 20 and not flat(train) & flat(val)

  def config(workdir, **kw):
    return cifar10_train.Config(
      model="tiny",
      epochs=4,
      batch_size=10,
      train_size=20,
      val_size=30,
      eval_batch_size=30,
      eval_every=2,
      test_every=4,
      checkpoint_every=2,
      data_dir=str(tmp_path / "data"),
      workdir=str(tmp_path / workdir),
      progress=False,
      devices=1,
      **kw,
    )

  whole = cifar10_train.train_and_evaluate(config("whole"))
  assert [sorted(k for k in r if k.startswith(("val", "test"))) for r in whole] == [
    [],
    ["val_acc", "val_loss"],
    [],
    ["test_acc", "test_loss", "val_acc", "val_loss"],
  ]
  # Checkpoints are named by the steps done, 2 an epoch: epochs 2 and 4.
  assert sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir()) == ["4", "8"]
  # Killed after epoch 3 (its checkpoint not due): the resumed run redoes epoch 3 from epoch 2's
  # checkpoint and ends as the uninterrupted one.
  cifar10_train.train_and_evaluate(config("cut", stop_after_epoch=3))
  shutil.rmtree(tmp_path / "cut" / "checkpoints" / "6")  # as if killed before it was written
  resumed = cifar10_train.train_and_evaluate(config("cut", resume=True))
  assert len(metrics.read_metrics(tmp_path / "cut")) == 4
  for a, b in zip(whole, resumed, strict=True):
    assert a["train_loss"] == b["train_loss"] and a.get("test_acc") == b.get("test_acc")


def test_the_figure_draws_validation_error_on_the_evaluated_epochs_only(tmp_path):
  from examples import plot

  folders = []
  for seed in (0, 1):
    workdir = tmp_path / f"run{seed}"
    workdir.mkdir()
    records = [{"epoch": e, "train_loss": 1.0 / e} for e in range(1, 5)]
    for r in records[1::2]:  # evaluated every 2 epochs
      r.update(val_acc=0.5 + 0.1 * seed, val_loss=1.0)
    metrics.write_metrics(workdir, records)
    folders.append(str(workdir))
  epochs, train, evaluated, error, name = plot._curves(folders)
  assert train[1] == [1.0, 0.5, 1.0 / 3, 0.25]
  assert epochs == [1, 2, 3, 4] and evaluated == [2, 4] and name == "validation error"
  assert error == [[0.5, 0.5], [pytest.approx(0.4), pytest.approx(0.4)]]
  plot.plot([folders], str(tmp_path / "figure.png"), ["sgdm"])
  assert (tmp_path / "figure.png").stat().st_size > 0
