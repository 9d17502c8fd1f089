"""The shared training loop (examples/training/) on a toy task that compiles in a second.

The toy task has what the real ones need: BatchNorm statistics and dropout (model state and
randomness), and a per-epoch carried state threaded through the steps, as an LSTM's is.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from examples import metrics, training

# optax's piecewise-constant schedule (the registry's step decay) compares a float with the int32
# step count, which strict dtype promotion rejects.
pytestmark = pytest.mark.standard_promotion

TIMING = {"epoch_seconds", "train_seconds", "eval_seconds", "examples_per_second"}


class ToyNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.dense = nnx.Linear(8, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.25)
    self.out = nnx.Linear(16, 2, rngs=rngs)

  def __call__(self, x, rng):
    h = nnx.relu(self.norm(self.dense(x)))
    return self.out(self.drop(h, rngs=rng))


class ToyTask(training.Task):
  """Binary labels of a random linear rule; the carry counts the steps of the epoch so far."""

  registry_task = "cifar10"
  unit = "examples"

  def __init__(self, n: int = 64, batch_size: int = 16, poison_epoch: int | None = None):
    rng = np.random.default_rng(0)
    self.x = rng.normal(size=(n, 8)).astype(np.float32)
    self.y = (self.x @ rng.normal(size=(8,)) > 0).astype(np.int32)
    self.batch_size = batch_size
    self.train_size = n
    self.steps_per_epoch = n // batch_size
    self.poison_epoch = poison_epoch
    self.epochs_started = 0  # task state kept in the checkpoints

  def init_model(self, rngs):
    return ToyNet(rngs)

  def checkpoint_state(self):
    return {"epochs_started": self.epochs_started}

  def restore_checkpoint_state(self, state):
    self.epochs_started = state["epochs_started"]

  def init_carry(self, batch_size):
    return jnp.zeros((batch_size,), jnp.float32)

  def train_batches(self, epoch, rng, start=0):
    self.epochs_started += start == 0
    order = np.asarray(jax.random.permutation(rng, self.train_size))
    for step in range(start, self.steps_per_epoch):
      index = order[step * self.batch_size : (step + 1) * self.batch_size]
      x = self.x[index]
      if epoch == self.poison_epoch:
        x = np.full_like(x, np.nan)
      yield {"x": jnp.asarray(x), "y": jnp.asarray(self.y[index])}

  def loss(self, model, batch, carry, rng, *, train):
    logits = model(batch["x"], rng)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    count = jnp.asarray(batch["y"].shape[0], jnp.float32)
    sums = {
      "loss": jnp.sum(losses),
      "correct": jnp.sum((jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)),
      "carry": jnp.sum(carry),
      "count": count,
    }
    return sums["loss"] / count, (carry + 1.0, sums)

  def evaluate(self, evaluator):
    batches = [
      {"x": jnp.asarray(self.x[i : i + 32]), "y": jnp.asarray(self.y[i : i + 32])}
      for i in range(0, self.train_size, 32)
    ]
    sums = evaluator.run(batches, carry=jnp.zeros((32,), jnp.float32))
    return {
      "test_loss": sums["loss"] / sums["count"],
      "test_acc": sums["correct"] / sums["count"],
      # The eval carry runs 0, 1, ... over the stream: its sum shows it is threaded through.
      "eval_carry": sums["carry"] / sums["count"],
    }


def config(tmp_path, name="run", **kwargs):
  base = dict(
    optimizer="padam", epochs=2, batch_size=16, workdir=str(tmp_path / name), progress=False
  )
  return training.LoopConfig(**{**base, **kwargs})


def without_timing(history):
  return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


def test_history_and_metrics_file(tmp_path):
  cfg = config(tmp_path)
  history = training.train(ToyTask(), cfg)
  assert [r["epoch"] for r in history] == [1, 2]
  assert [r["step"] for r in history] == [4, 8]
  for key in (
    "lr",
    "train_loss",
    "train_correct",
    "test_loss",
    "test_acc",
    "epoch_seconds",
    "examples_per_second",
  ):
    assert all(np.isfinite(r[key]) for r in history), key
  assert metrics.read_metrics(cfg.workdir) == history
  run = metrics.read_run(cfg.workdir)
  assert run["optimizer"]["optimizer"] == "padam" and run["config"]["epochs"] == 2


def test_learning_rate_logged_from_the_schedule(tmp_path):
  # 4 epochs of 4 steps: the registry decays x0.1 at steps 8 and 12, the starts of epochs 3 and 4.
  history = training.train(ToyTask(), config(tmp_path, epochs=4, optimizer="sgdm"))
  lrs = [r["lr"] for r in history]
  np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.001], rtol=1e-6)


def test_carry_is_threaded_and_reset_every_epoch(tmp_path):
  history = training.train(ToyTask(), config(tmp_path))
  # Steps 0..3 see carries 0..3 on each of 16 rows; summarize divides by the 64 examples.
  expected = sum(range(4)) * 16 / 64
  assert [r["train_carry"] for r in history] == [expected, expected]
  # Evaluation: two batches of 32 rows starting from a zero carry: (0 + 1) * 32 / 64.
  assert history[0]["eval_carry"] == 0.5


def test_same_seed_same_run_other_seed_other_run(tmp_path):
  # One device: the same run on one device as on eight is test_eight_devices_match_one's point.
  a = training.train(ToyTask(), config(tmp_path, "a", epochs=1, devices=1))
  b = training.train(ToyTask(), config(tmp_path, "b", epochs=1, devices=1))
  c = training.train(ToyTask(), config(tmp_path, "c", epochs=1, seed=1, devices=1))
  assert without_timing(a) == without_timing(b)
  assert without_timing(a) != without_timing(c)


def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
  full = training.train(ToyTask(), config(tmp_path, "full", epochs=3))
  cfg = config(tmp_path, "parts", epochs=3)
  first = training.train(ToyTask(), dataclasses.replace(cfg, stop_after_epoch=1))
  assert len(first) == 1
  task = ToyTask()
  resumed = training.train(task, dataclasses.replace(cfg, resume=True))
  assert without_timing(resumed) == without_timing(full)
  assert without_timing(metrics.read_metrics(cfg.workdir)) == without_timing(full)
  assert task.epochs_started == 3  # 1 restored from the checkpoint + 2 run here


def test_resume_refuses_other_settings_and_fresh_run_refuses_old_checkpoints(tmp_path):
  cfg = config(tmp_path, epochs=2, stop_after_epoch=1)
  training.train(ToyTask(), cfg)
  with pytest.raises(ValueError, match="--resume"):
    training.train(ToyTask(), cfg)
  with pytest.raises(ValueError, match=r"seed.*only --lr may change"):
    training.train(ToyTask(), dataclasses.replace(cfg, resume=True, seed=1))


def test_resume_without_checkpoint_starts_fresh(tmp_path):
  history = training.train(ToyTask(), config(tmp_path, epochs=1, resume=True))
  assert len(history) == 1


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = config(tmp_path, epochs=3, devices=1)
  with pytest.raises(training.NonFiniteLossError, match="epoch 2") as error:
    training.train(ToyTask(poison_epoch=2), cfg)
  assert "epoch 1" in str(error.value)  # the checkpoint kept
  assert [r["epoch"] for r in metrics.read_metrics(cfg.workdir)] == [1]
  # The kept checkpoint resumes (here with clean data) to the uninterrupted result.
  resumed = training.train(ToyTask(), dataclasses.replace(cfg, resume=True))
  full = training.train(ToyTask(), config(tmp_path, "full", epochs=3, devices=1))
  assert without_timing(resumed) == without_timing(full)


def test_eight_devices_match_one(tmp_path):
  assert len(jax.devices()) == 8, "tests/conftest.py forces 8 host devices"
  one = training.train(ToyTask(), config(tmp_path, "one", epochs=1, devices=1))
  eight = training.train(ToyTask(), config(tmp_path, "eight", epochs=1, devices=8))
  assert len(metrics.read_run(tmp_path / "eight")["devices"]) == 8
  a, b = without_timing(one)[0], without_timing(eight)[0]
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_allclose(b[key], a[key], rtol=2e-5, err_msg=key)


def test_batch_must_split_over_devices(tmp_path):
  with pytest.raises(ValueError, match="multiple"):
    training.train(ToyTask(batch_size=12, n=48), config(tmp_path, batch_size=12, devices=8))


def test_unknown_optimizer_lists_valid_names(tmp_path):
  with pytest.raises(ValueError, match="padam") as error:
    training.train(ToyTask(), config(tmp_path, optimizer="adamax-typo"))
  assert "sgdm" in str(error.value)


def test_read_metrics_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    metrics.read_metrics(tmp_path)
  (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n')
  with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
    metrics.read_metrics(tmp_path)


def test_plot_reads_metrics_and_writes_png(tmp_path):
  from examples import plot

  for name, loss in (("a", 2.0), ("b", 1.5)):
    (tmp_path / name).mkdir()
    metrics.write_metrics(
      tmp_path / name,
      [{"epoch": e, "train_loss": loss / e, "test_acc": 0.1 * e} for e in (1, 2, 3)],
    )
  out = tmp_path / "fig" / "curves.png"
  plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--labels", "A", "B"])
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="labels"):
    plot.plot([str(tmp_path / "a")], str(out), labels=["A", "B"])


def test_plot_draws_seed_groups_as_mean_and_range(tmp_path, monkeypatch):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from examples import plot

  for name, scale, epochs in (("s0", 1.0, 4), ("s1", 3.0, 3), ("other", 2.0, 4)):
    (tmp_path / name).mkdir()
    metrics.write_metrics(
      tmp_path / name,
      [
        {"epoch": e, "train_loss": scale / e, "test_acc": 0.1 * scale * e}
        for e in range(1, epochs + 1)
      ],
    )
  figures = []
  monkeypatch.setattr(plt, "close", figures.append)
  out = tmp_path / "curves.png"
  plot.plot(
    [[tmp_path / "s0", tmp_path / "s1"], str(tmp_path / "other")], str(out), ["grouped", "single"]
  )
  assert out.exists()
  left, right = figures[0].axes
  grouped, single = left.get_lines()
  # The group: the epochs both seeds have (3), their mean, and one shaded band.
  np.testing.assert_allclose(grouped.get_xdata(), [1, 2, 3])
  np.testing.assert_allclose(grouped.get_ydata(), [2.0 / e for e in (1, 2, 3)])
  np.testing.assert_allclose(right.get_lines()[0].get_ydata(), [1.0 - 0.2 * e for e in (1, 2, 3)])
  np.testing.assert_allclose(single.get_ydata(), [2.0 / e for e in (1, 2, 3, 4)])
  assert grouped.get_label() == "grouped (mean of 2)" and single.get_label() == "single"
  band = left.collections[0].get_paths()[0].vertices
  assert band[:, 1].min() == pytest.approx(1.0 / 3) and band[:, 1].max() == pytest.approx(3.0)
  assert len(left.collections) == 1
  with pytest.raises(ValueError, match="empty group"):
    plot.plot([[]], str(out))


def test_plot_draws_validation_perplexity_when_the_test_text_is_scored_once(tmp_path):
  from examples import plot

  records = [{"epoch": e, "train_loss": 5.0 / e, "valid_ppl": 300.0 / e} for e in (1, 2, 3)]
  records[-1]["test_ppl"] = 90.0
  metrics.write_metrics(tmp_path, records)
  epochs, _, evaluated, right, name = plot._curves([str(tmp_path)])
  assert (epochs, evaluated, name) == ([1, 2, 3], [1, 2, 3], "validation perplexity")
  assert right == [[300.0, 150.0, 100.0]]


def test_plot_refuses_missing_runs_mixed_runs_and_mixed_kinds_in_one_line(tmp_path, capsys):
  from examples import plot

  out = str(tmp_path / "curves.png")
  assert plot.main([str(tmp_path / "missing"), "--out", out]) == 2
  (tmp_path / "twice").mkdir()
  # Two runs in one folder: epochs 1, 1, 2, 2.
  records = [{"epoch": e, "train_loss": 1.0, "test_acc": 0.5} for e in (1, 1, 2, 2)]
  (tmp_path / "twice" / "metrics.jsonl").write_text("".join(f"{json.dumps(r)}\n" for r in records))
  assert plot.main([str(tmp_path / "twice"), "--out", out]) == 2
  for name, key in (("images", "test_acc"), ("words", "test_ppl")):
    (tmp_path / name).mkdir()
    metrics.write_metrics(tmp_path / name, [{"epoch": 1, "train_loss": 1.0, key: 0.5}])
  assert plot.main([str(tmp_path / "images"), str(tmp_path / "words"), "--out", out]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), lines
  assert "missing" in lines[0] and "epoch 1 after epoch 1" in lines[1]
  assert "test error" in lines[2] and "test perplexity" in lines[2]
  assert not (tmp_path / "curves.png").exists()
