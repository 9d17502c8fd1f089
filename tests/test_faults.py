"""Faults and bad input in the trainers: what a run refuses, keeps and verifies.

The loop's guarantees on the toy task of test_training.py (a non-finite state is never
checkpointed; a corrupt newest checkpoint falls back to a verified one; other data is refused), and
the command lines' (bad options rejected before any data is loaded or model built, a previous run
never overwritten, exit statuses) on a CIFAR-10 model small enough to compile in a second.
"""

import dataclasses
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cifar10 import TinyNet, synthetic_cifar
from test_training import ToyTask, config, without_timing

from examples import cli, metrics, training
from examples.cifar10 import __main__ as cifar10_main
from examples.cifar10 import input_pipeline, models
from examples.ptb import __main__ as ptb_main
from examples.ptb import input_pipeline as ptb_input
from examples.training import loop

# optax's step-decay schedule compares a float with the int32 step (see test_training.py).
pytestmark = pytest.mark.standard_promotion


@jax.custom_vjp
def nan_gradient(x, poison):
  """``x``, whose gradient is NaN where ``poison`` is 1 (the value stays finite)."""
  del poison
  return x


def _nan_gradient_fwd(x, poison):
  return x, poison


def _nan_gradient_bwd(poison, g):
  return g * jnp.where(poison > 0, jnp.nan, 1.0), jnp.zeros_like(poison)


nan_gradient.defvjp(_nan_gradient_fwd, _nan_gradient_bwd)


class PoisonedTask(ToyTask):
  """The toy task whose last step of ``poison_epoch`` gets a NaN gradient: that epoch's loss is
  finite, the state it ends with is not."""

  def __init__(self, poison_epoch=None, data_seed=None, **kwargs):
    super().__init__(**kwargs)
    self.last_step_poison = poison_epoch
    if data_seed is not None:
      self.x = np.random.default_rng(data_seed).normal(size=self.x.shape).astype(np.float32)

  def describe_data(self):
    return {"files": ["toy"], "sha256": training.fingerprint({"x": self.x, "y": self.y})}

  def train_batches(self, epoch, rng):
    for step, batch in enumerate(super().train_batches(epoch, rng)):
      poisoned = epoch == self.last_step_poison and step == self.steps_per_epoch - 1
      yield {**batch, "poison": jnp.full((self.batch_size,), float(poisoned), jnp.float32)}

  def loss(self, model, batch, carry, rng, *, train):
    poison = jnp.max(batch["poison"]) if "poison" in batch else jnp.zeros((), jnp.float32)

    def poisoned_model(x, rng):
      return nan_gradient(model(x, rng), poison)

    return super().loss(poisoned_model, batch, carry, rng, train=train)


# --- the loop ------------------------------------------------------------------------------------


def test_non_finite_state_is_not_checkpointed_and_a_lower_lr_continues(tmp_path):
  cfg = config(tmp_path, epochs=3, devices=1)
  with pytest.raises(training.NonFiniteLossError, match="after epoch 2") as error:
    training.train(PoisonedTask(poison_epoch=2), cfg)
  message = str(error.value)
  assert "epoch 1" in message and "--resume" in message and "--lr (e.g. 0.01)" in message
  # Checkpoints are named by the steps done: epoch 1's after its 4 steps.
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["4"]
  assert [r["epoch"] for r in metrics.read_metrics(cfg.workdir)] == [1]
  stopped = metrics.read_stopped(cfg.workdir)
  assert stopped["after_epoch"] == 1 and "non-finite" in stopped["reason"]
  # The kept checkpoint is finite: resuming from it with half the rate trains on finitely, the new
  # base rate taking the same decay steps (3 epochs of 4 steps: x0.1 from step 6 and 9).
  history = training.train(
    PoisonedTask(), dataclasses.replace(cfg, resume=True, learning_rate=0.05)
  )
  assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["test_loss"]) for r in history)
  np.testing.assert_allclose([r["lr"] for r in history], [0.1, 0.05, 0.005], rtol=1e-6)
  run = metrics.read_run(cfg.workdir)
  assert run["resumptions"] == [{"after_epoch": 1, "changed": {"learning_rate": [None, 0.05]}}]
  assert run["optimizer"]["learning_rate"] == 0.05
  assert metrics.read_stopped(cfg.workdir) is None  # the resumed run removed it


def _data_files(checkpoint):
  """The files of a checkpoint's array data (Orbax's OCDBT layout: ``d/`` folders)."""
  return [p for p in (checkpoint / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


def _flip_bytes(checkpoint):
  for path in _data_files(checkpoint):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 16):
      data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(checkpoint):
  for path in _data_files(checkpoint):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_corrupt_newest_checkpoint_falls_back_to_the_verified_one(tmp_path, capsys):
  # One device: the fallback does not depend on the mesh (the resume tests of test_training.py
  # restore onto several).
  full = training.train(PoisonedTask(), config(tmp_path, "full", epochs=3, devices=1))
  cfg = config(tmp_path, epochs=3, devices=1)
  training.train(PoisonedTask(), dataclasses.replace(cfg, stop_after_epoch=2))
  checkpoints = tmp_path / "run" / "checkpoints"
  resume = dataclasses.replace(cfg, resume=True)
  for corrupt in (_flip_bytes, _truncate):
    newest = max(int(p.name) for p in checkpoints.iterdir())
    corrupt(checkpoints / str(newest))
    capsys.readouterr()
    history = training.train(PoisonedTask(), resume)
    err = capsys.readouterr().err
    assert (
      f"the checkpoint of epoch {newest // 4} ({checkpoints / str(newest)})" in err
      and "deleted, continuing from epoch" in err
    )
    assert "Traceback" not in err
    assert without_timing(history) == without_timing(full), corrupt
    assert without_timing(metrics.read_metrics(cfg.workdir)) == without_timing(full)
  assert sorted(os.listdir(checkpoints)) == ["12", "8"]


def test_resume_on_other_data_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
  cfg = config(tmp_path, epochs=2)
  training.train(PoisonedTask(), dataclasses.replace(cfg, stop_after_epoch=1))
  run = metrics.read_run(cfg.workdir)
  assert run["data"]["sha256"] == PoisonedTask().describe_data()["sha256"]
  monkeypatch.setattr(loop, "make_state", _must_not_run)
  with pytest.raises(ValueError, match="data differ"):
    training.train(PoisonedTask(data_seed=1), dataclasses.replace(cfg, resume=True))


def _must_not_run(*args, **kwargs):
  raise AssertionError("got past the checks")


# --- the command lines ---------------------------------------------------------------------------


@pytest.fixture
def cifar(tmp_path, monkeypatch):
  """Synthetic data folders (``data``, and ``other`` with other images) and argv for a tiny run."""
  monkeypatch.setitem(models.MODELS, "tiny", TinyNet)
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # main() may add XNNPACK's
  for name, seed in (("data", 0), ("other", 1)):
    (tmp_path / name).mkdir()
    np.savez(tmp_path / name / "cifar10.npz", **synthetic_cifar(n_train=20, n_test=10, seed=seed))
  return [
    "--model", "tiny", "--epochs", "1", "--batch-size", "8", "--eval-batch-size", "10",
    "--devices", "1", "--no-progress", "--no-xnnpack", "--data-dir", str(tmp_path / "data"),
    "--workdir", str(tmp_path / "run"),
  ]  # fmt: skip


def _no_data_no_model(monkeypatch):
  """Makes loading data or building a model fail the test."""
  monkeypatch.setattr(input_pipeline, "load", _must_not_run)
  monkeypatch.setattr(ptb_input, "load", _must_not_run)
  monkeypatch.setattr(loop, "make_state", _must_not_run)


def _one_line_error(capsys, *words):
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
  for word in words:
    assert word in err, (word, err)
  return err


def test_a_new_run_refuses_a_previous_runs_files(cifar, tmp_path, capsys, monkeypatch):
  # A committed results folder: metrics.jsonl and run.json, no checkpoints.
  workdir = tmp_path / "run"
  workdir.mkdir()
  metrics.write_metrics(workdir, [{"epoch": 1, "test_acc": 0.5}])
  (workdir / "run.json").write_text("{}\n")
  _no_data_no_model(monkeypatch)
  assert cifar10_main.main(cifar) == cli.EXIT_USAGE
  _one_line_error(capsys, "holds a previous run", "metrics.jsonl", "run.json", "--overwrite")
  # --resume without a checkpoint: refused too, as the finished epoch would be lost.
  assert cifar10_main.main([*cifar, "--resume"]) == cli.EXIT_USAGE
  _one_line_error(capsys, "1 finished epoch", "no checkpoint", "--overwrite")
  assert metrics.read_metrics(workdir) == [{"epoch": 1, "test_acc": 0.5}]
  assert (workdir / "run.json").read_text() == "{}\n"


def test_the_command_line_refuses_to_mix_runs_and_overwrites_when_asked(cifar, tmp_path, capsys):
  assert cifar10_main.main(cifar) == cli.EXIT_OK
  first = metrics.read_metrics(tmp_path / "run")
  run = metrics.read_run(tmp_path / "run")
  for name in ("workdir", "data_dir"):  # no path of the machine: relative, never above the folder
    recorded = pathlib.PurePath(run["config"][name])
    assert not recorded.is_absolute() and ".." not in recorded.parts, recorded
  assert pathlib.PurePath(run["config"]["data_dir"]).name == "data"
  assert run["data"]["files"] == ["cifar10.npz"] and len(run["data"]["sha256"]) == 64
  capsys.readouterr()
  refused = [
    ([], ["holds a previous run", "--resume"]),
    (["--resume", "--data-dir", str(tmp_path / "other")], ["data differ"]),
    (["--resume", "--optimizer", "sgdm"], ["settings differ", "optimizer"]),
    (["--resume", "--model", "resnet8"], ["settings differ", "model"]),
    (["--resume", "--overwrite"], ["--resume and --overwrite"]),
  ]
  for extra, words in refused:
    assert cifar10_main.main([*cifar, *extra]) == cli.EXIT_USAGE, extra
    _one_line_error(capsys, *words)
  assert metrics.read_metrics(tmp_path / "run") == first
  # Garbled or missing metadata: one line naming the file.
  (checkpoint,) = (tmp_path / "run" / "checkpoints").iterdir()
  meta = checkpoint / "meta" / "metadata"
  meta.write_text("{not json")
  assert cifar10_main.main([*cifar, "--resume"]) == cli.EXIT_USAGE
  _one_line_error(capsys, f"{meta} is not valid JSON")
  meta.unlink()
  assert cifar10_main.main([*cifar, "--resume"]) == cli.EXIT_USAGE
  _one_line_error(capsys, f"{meta} is missing")
  # --overwrite replaces the run: another seed, other numbers.
  assert cifar10_main.main([*cifar, "--overwrite", "--seed", "1"]) == cli.EXIT_OK
  assert "Replaced the previous run" in capsys.readouterr().err
  second = metrics.read_metrics(tmp_path / "run")
  assert len(second) == 1 and second != first
  assert metrics.read_run(tmp_path / "run")["config"]["seed"] == 1


BAD_OPTIONS = [
  (["--eval-batch-size", "0"], "--eval-batch-size 0"),
  (["--batch-size", "0"], "--batch-size 0"),
  (["--batch-size", "12", "--devices", "8"], "multiple of the 8 devices"),
  (["--devices", "99"], "--devices 99"),
  (["--epochs", "0"], "--epochs 0"),
  (["--lr", "-0.1"], "--lr -0.1"),
  (["--lr", "0"], "--lr 0"),
  (["--lr", "nan"], "--lr nan"),
  (["--hparam", "p=abc"], '--hparam p="abc"'),
  (["--hparam", "p=null"], "--hparam p=null"),
  (["--hparam", "p=NaN"], "--hparam p=NaN"),
  (["--hparam", "learning_rate=0.2"], "--lr"),
  (["--hparam", "nesterov=1", "--optimizer", "sgdm"], "true or false"),
  (["--hparam", "colour=1"], "no hyperparameter 'colour'"),
]


@pytest.mark.parametrize(("extra", "words"), BAD_OPTIONS, ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_a_bad_option_is_one_line_before_any_data_or_model(
  cifar, capsys, monkeypatch, extra, words
):
  _no_data_no_model(monkeypatch)
  assert cifar10_main.main([*cifar, *extra]) == cli.EXIT_USAGE
  _one_line_error(capsys, words, "is not valid")


def test_a_workdir_that_cannot_be_written_is_one_line(cifar, tmp_path, capsys, monkeypatch):
  _no_data_no_model(monkeypatch)
  (tmp_path / "file").write_text("")
  for workdir in (tmp_path / "file", tmp_path / "file" / "run"):
    assert cifar10_main.main([*cifar, "--workdir", str(workdir)]) == cli.EXIT_USAGE
    _one_line_error(capsys, f"--workdir {workdir} is not valid")
  # checkpoints/ that is a file stands for one that cannot be written (root ignores permissions).
  (tmp_path / "w").mkdir()
  (tmp_path / "w" / "checkpoints").write_text("")
  assert cifar10_main.main([*cifar, "--workdir", str(tmp_path / "w"), "--overwrite"]) == 2
  _one_line_error(capsys, "cannot write to", "checkpoints")


@pytest.mark.parametrize(
  "extra", [["--eval-batch-size", "0"], ["--clip", "-1"], ["--bptt", "0"], ["--lr", "-1"]]
)
def test_the_ptb_trainer_checks_its_options_first(tmp_path, capsys, monkeypatch, extra):
  _no_data_no_model(monkeypatch)
  argv = ["--model", "lstm2-tiny", "--workdir", str(tmp_path / "run"), "--no-xnnpack", *extra]
  assert ptb_main.main(argv) == cli.EXIT_USAGE
  _one_line_error(capsys, f"{extra[0]} ", "is not valid")


def test_help_lists_overwrite_and_the_exit_statuses(capsys):
  for main in (cifar10_main, ptb_main):
    with pytest.raises(SystemExit):
      main.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--overwrite" in out and "Exit status" in out and "3 stopped" in out


def test_a_non_finite_stop_exits_with_its_own_status(cifar, capsys, monkeypatch):
  def diverge(*args, **kwargs):
    raise training.NonFiniteLossError("non-finite training loss")

  monkeypatch.setattr(training, "train", diverge)
  assert cifar10_main.main(cifar) == cli.EXIT_NON_FINITE == 3
  _one_line_error(capsys, "non-finite")


class DivergedEvaluation(ToyTask):
  """The toy task whose evaluation is NaN while its training loss stays finite (a model trained
  at a rate so high that it overflows on other data)."""

  def evaluate(self, evaluator):
    return {k: float("nan") for k in super().evaluate(evaluator)}


def test_a_non_finite_evaluation_stops_before_the_epoch_is_recorded(tmp_path):
  cfg = config(tmp_path, epochs=2, devices=1)
  with pytest.raises(training.NonFiniteLossError, match="non-finite evaluation after epoch 1") as e:
    training.train(DivergedEvaluation(), cfg)
  assert "There is no checkpoint with finite metrics" in str(e.value)
  assert metrics.read_metrics(cfg.workdir) == []
  assert not os.listdir(tmp_path / "run" / "checkpoints")


def test_resume_of_a_finished_run_changes_nothing(tmp_path, capsys):
  cfg = config(tmp_path, epochs=1, devices=1)
  history = training.train(ToyTask(), cfg)
  run = (tmp_path / "run" / "run.json").read_text()
  capsys.readouterr()
  again = training.train(ToyTask(), dataclasses.replace(cfg, resume=True, learning_rate=0.05))
  assert "the run has finished (epoch 1 of 1); nothing to do" in capsys.readouterr().err
  assert again == history and (tmp_path / "run" / "run.json").read_text() == run


# --- the edges: messages and refusals that say what happened ------------------------------------


def test_resume_into_a_folder_without_a_run_says_so_and_starts_one(tmp_path, capsys):
  cfg = config(tmp_path, epochs=1, devices=1)
  history = training.train(ToyTask(), dataclasses.replace(cfg, resume=True))
  err = capsys.readouterr().err
  assert f"--resume: {tmp_path / 'run'} holds no run to continue; starting a new one" in err
  assert [r["epoch"] for r in history] == [1]


def test_an_unreadable_error_message_gives_way_to_its_cause():
  from examples.training.checkpoints import _first_line

  bound = ValueError(object().__str__)  # its message is only a repr: "<method-wrapper ...>"
  assert _first_line(bound) == "no readable message"
  bound.__cause__ = OSError("Error reading 'd/3a39' in OCDBT database")
  assert _first_line(bound) == "Error reading 'd/3a39' in OCDBT database"
  assert _first_line(ValueError("first\nsecond")) == "first"


class ExplodingTask(ToyTask):
  """The toy task whose loss of a uniform prediction is said to be tiny: its real loss is then
  far above 1,000 times it, as a diverged run's would be."""

  chance_loss = 1e-7


def test_a_finite_explosion_stops_like_a_non_finite_loss(tmp_path):
  cfg = config(tmp_path, epochs=2, devices=1)
  with pytest.raises(training.NonFiniteLossError, match="diverged training loss in epoch 1") as e:
    training.train(ExplodingTask(), cfg)
  assert "above 1000x the loss of a uniform prediction (1e-07)" in str(e.value)
  assert "--lr" in str(e.value)
  assert "diverged" in metrics.read_stopped(cfg.workdir)["reason"]
  assert training.NonFiniteLossError.exit_status == cli.EXIT_NON_FINITE == 3


def test_refusals_name_the_flag_before_the_data_and_leave_no_folder(
  cifar, tmp_path, capsys, monkeypatch
):
  _no_data_no_model(monkeypatch)
  argv = [*cifar[:-1], str(tmp_path / "new" / "run")]
  assert cifar10_main.main([*argv, "--optimizer", "adam", "--state-bits", "16"]) == 2
  err = _one_line_error(capsys, "--state-bits 16 is not valid for adam")
  assert "()" not in err
  assert cifar10_main.main([*argv, "--train-size", "60000"]) == 2
  _one_line_error(capsys, "--train-size 60000 is not valid; CIFAR-10 has 50,000 training images")
  assert cifar10_main.main([*argv, "--train-size", "45000", "--val-size", "10000"]) == 2
  _one_line_error(capsys, "--train-size 45000 and --val-size 10000 are not valid together")
  assert not (tmp_path / "new" / "run").exists()


def test_a_refused_run_removes_the_folder_it_made_and_a_folder_is_not_a_file(
  cifar, tmp_path, capsys
):
  (tmp_path / "folder" / "cifar10.npz").mkdir(parents=True)
  argv = [*cifar[:-4], "--data-dir", str(tmp_path / "folder"), "--workdir", str(tmp_path / "w")]
  assert cifar10_main.main(argv) == 2
  _one_line_error(capsys, "cifar10.npz is a folder, not a file")
  assert not (tmp_path / "w").exists()  # made for the run, left with nothing in it but a lock
  (tmp_path / "kept").mkdir()  # a folder that was there before the run is kept
  assert cifar10_main.main([*argv[:-1], str(tmp_path / "kept")]) == 2
  assert (tmp_path / "kept").is_dir()


def test_the_checkpoint_clock_starts_after_the_first_call():
  import time

  from examples.training.preemption import Stops

  stops = Stops(minutes=0.02 / 60)  # 20 ms
  time.sleep(0.05)  # compiling the step
  assert stops.check(1) == (False, False)  # the clock starts now
  assert stops.check(2) == (False, False)
  time.sleep(0.05)
  assert stops.check(3) == (True, False)


def test_plot_tells_apart_runs_that_would_share_a_label(tmp_path):
  from examples import plot

  for name in ("a", "b", "c"):
    (tmp_path / name).mkdir()
    optimizer = "sgdm" if name == "c" else "padam"
    run = {"config": {"optimizer": optimizer, "model": "resnet8"}}
    (tmp_path / name / "run.json").write_text(__import__("json").dumps(run))
  labels = plot._labels([str(tmp_path / n) for n in ("a", "b", "c")])
  assert labels == ["padam (resnet8), a", "padam (resnet8), b", "sgdm (resnet8)"]
