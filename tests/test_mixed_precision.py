"""Mixed precision in the trainers (``--dtype``): bfloat16 steps against float32 ones, float32
parameters and optimizer state, the PTB LSTM in bfloat16, the flag and resumption."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples import training
from examples.cifar10 import __main__ as cifar_main
from examples.cifar10 import input_pipeline as cifar_input
from examples.cifar10 import train as cifar_train
from examples.ptb import input_pipeline as ptb_input
from examples.ptb import models as ptb_models
from examples.ptb import train as ptb_train
from examples.training import checkpoints, devices, loop, records, settings
from examples.training.steps import Steps, make_state

STEPS = 8
# bfloat16 keeps 8 significant bits, and each layer rounds its activations and their gradients:
# the first update of the smallest ResNet's parameters differs from the float32 one by 8.1% of its
# norm (cosine 0.997; the classifier's by 0.6%, the first convolution's by 15%).
FIRST_STEP_RTOL = 0.15


def learnable_cifar(n=32):
  """Images whose brightness tells the class, with noise: a few steps lower the loss."""
  rng = np.random.default_rng(0)
  labels = np.arange(n, dtype=np.int32) % 10
  noise = rng.integers(0, 40, (n, 32, 32, 3))
  images = np.clip(labels[:, None, None, None] * 22 + noise, 0, 255).astype(np.uint8)
  return cifar_input.Split(images, labels)


def run_steps(task, config, steps):
  """The trainer's state and its first ``steps`` steps, all on the first batch of epoch 1.

  The root key is an RBG one: its random-number programs (initializers, augmentation) compile
  several times faster on a CPU than the default threefry's, with the same trainer code.

  Returns:
    The parameters (host arrays) before the first step and after it, the state after the last
    step, and the mean loss of each step.
  """
  mesh = devices.make_mesh(1)
  root = jax.random.key(config.seed, impl="rbg")
  tx = settings.make_optimizer(task, config).tx
  model, state = make_state(task, tx, root, mesh)
  jitted = Steps(task, model, mesh)
  key = loop.epoch_key(root, 1)
  batch = jitted.shard(next(iter(task.train_batches(1, key))))
  carry = jitted.shard(task.init_carry(config.batch_size))
  sums = jitted.zero_sums(state, carry, batch, key)
  jitted.compile(state, carry, sums, batch, key)
  leaves = [list(checkpoints.host_leaves(nnx.filter_state(state, nnx.Param)))]
  losses, previous = [], {"loss": 0.0, "count": 0.0}
  for index in range(steps):
    state, carry, sums = jitted.train(state, carry, sums, batch, key, index)
    if index == 0:
      leaves.append(list(checkpoints.host_leaves(nnx.filter_state(state, nnx.Param))))
    totals = {k: float(sums[k]) for k in previous}
    losses.append((totals["loss"] - previous["loss"]) / (totals["count"] - previous["count"]))
    previous = totals
  return leaves[0], leaves[1], state, losses


@pytest.fixture(scope="module")
def cifar_runs(tmp_path_factory):
  split = learnable_cifar()
  runs = {}
  for dtype in ("float32", "bfloat16"):
    config = cifar_train.Config(
      model="resnet8_w0.5",
      batch_size=16,
      epochs=10,
      workdir=str(tmp_path_factory.mktemp(dtype)),
      dtype=dtype,
    )
    runs[dtype] = run_steps(cifar_train.Cifar10Task(config, split, split), config, STEPS)
  return runs


def float_leaves(state):
  """``{path: host array}`` of the floating-point arrays of ``state``."""
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  return {
    jax.tree_util.keystr(path): np.asarray(x)
    for path, x in flat
    if jnp.issubdtype(x.dtype, jnp.floating)
  }


def all_finite(leaves):
  return all(np.all(np.isfinite(x.astype(np.float32))) for x in leaves.values())


def test_bfloat16_cifar_trains_and_its_first_update_is_close_to_float32(cifar_runs):
  losses = cifar_runs["bfloat16"][3]
  assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
  updates = {}
  for dtype, (before, after, _, _) in cifar_runs.items():
    updates[dtype] = np.concatenate(
      [(a.astype(np.float64) - b).ravel() for a, b in zip(after, before, strict=True)]
    )
  reference = updates["float32"]
  assert np.linalg.norm(reference) > 0
  difference = np.linalg.norm(updates["bfloat16"] - reference) / np.linalg.norm(reference)
  assert difference < FIRST_STEP_RTOL, difference


def test_bfloat16_keeps_parameters_optimizer_state_and_statistics_float32(cifar_runs):
  leaves = float_leaves(cifar_runs["bfloat16"][2])
  assert any("['mu']" in path for path in leaves) and any("mean" in path for path in leaves)
  assert {x.dtype for x in leaves.values()} == {np.dtype(np.float32)}
  assert all_finite(leaves)


def tiny_corpus():
  words = (" the cat sat on a mat\n a dog ran\n" * 30).replace("\n", " <eos> ").split()
  vocab = ptb_input.build_vocab(words)
  tokens = ptb_input.encode(words, vocab)
  return ptb_input.Corpus(vocab, tokens, tokens[:40], tokens[:40])


def test_bfloat16_lstm_step_with_a_bfloat16_first_moment(tmp_path, monkeypatch):
  monkeypatch.setitem(
    ptb_models.MODELS, "mp-lstm", ptb_models.ModelSpec(embed_size=8, hidden_sizes=(8,), bptt=3)
  )
  config = ptb_train.Config(
    model="mp-lstm",
    batch_size=4,
    workdir=str(tmp_path),
    dtype="bfloat16",
    hparams={"mu_dtype": "bfloat16"},
  )
  task = ptb_train.PtbTask(config, tiny_corpus())
  model = nnx.eval_shape(lambda: task.init_model(nnx.Rngs(0)))
  tokens = jax.ShapeDtypeStruct((4, 5), jnp.int32)
  logits, carry = nnx.eval_shape(lambda m, t: m(t, m.zero_carry(4)), model, tokens)
  assert logits.dtype == jnp.float32
  assert {x.dtype for x in jax.tree.leaves(carry)} == {jnp.dtype(jnp.float32)}
  before, after, state, losses = run_steps(task, config, 2)
  assert all(np.isfinite(losses))
  assert any(not np.array_equal(a, b) for a, b in zip(after, before, strict=True))
  leaves = float_leaves(state)
  assert all_finite(leaves)
  for path, x in leaves.items():
    assert x.dtype == (jnp.bfloat16 if "['mu']" in path else np.float32), path


def test_dtype_flag_is_checked_and_resume_refuses_another_dtype(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    cifar_main.parse_args(["--dtype", "float64", "--workdir", "w"])
  assert exit_.value.code == 2 and "bfloat16" in capsys.readouterr().err
  with pytest.raises(ValueError, match="valid dtypes: float32, bfloat16, float16"):
    cifar_train.Config(workdir=str(tmp_path), dtype="half")
  bad_moment = training.LoopConfig(workdir=str(tmp_path), hparams={"mu_dtype": "float64"})
  with pytest.raises(
    ValueError, match=r'^--hparam mu_dtype="float64" is not valid; expected float32'
  ):
    settings.check_optimizer(bad_moment, "cifar10")
  saved = training.LoopConfig(workdir=str(tmp_path), dtype="bfloat16")
  meta = tmp_path / checkpoints.CHECKPOINTS_DIR / "1" / "meta" / "metadata"
  meta.parent.mkdir(parents=True)

  def save(config_record):
    meta.write_text(json.dumps({"epoch": 1, "history": [], "config": config_record, "rng": [0]}))

  save(dataclasses.asdict(saved))
  again = training.LoopConfig(workdir=str(tmp_path), resume=True, dtype="bfloat16")
  assert records.check_previous_run(again).dtype == "bfloat16"
  other = training.LoopConfig(workdir=str(tmp_path), resume=True)
  with pytest.raises(ValueError, match="dtype: checkpoint 'bfloat16', now 'float32'"):
    records.check_previous_run(other)
  # A checkpoint written before --dtype existed was float32.
  record = dataclasses.asdict(saved)
  del record["dtype"]
  save(record)
  assert records.check_previous_run(other).dtype == "float32"
  with pytest.raises(ValueError, match="dtype: checkpoint 'float32', now 'bfloat16'"):
    records.check_previous_run(again)


def test_state_bits_shrink_the_optimizer_state_and_are_checked(tmp_path, capsys, monkeypatch):
  from test_cifar10 import synthetic_cifar
  from test_multiprocess import WideNet

  from examples.cifar10 import models

  monkeypatch.setitem(models.MODELS, "wide", WideNet)  # nearly all one 3072 x 16 matrix
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # main() may add XNNPACK's
  np.savez(tmp_path / "cifar10.npz", **synthetic_cifar(n_train=16, n_test=8))
  args = ["--model", "wide", "--batch-size", "8", "--eval-batch-size", "8", "--epochs", "1"]
  args += ["--devices", "1", "--no-progress", "--no-xnnpack", "--data-dir", str(tmp_path)]
  state = {}
  for bits in (32, 16, 8):
    workdir = tmp_path / f"bits{bits}"
    assert cifar_main.main([*args, "--workdir", str(workdir), "--state-bits", str(bits)]) == 0
    run = json.loads((workdir / "run.json").read_text())
    state[bits] = run["optimizer_state_bytes"] / run["param_bytes"]
    assert run["optimizer"].get("state_bits", 32) == bits
    assert np.isfinite(json.loads((workdir / "metrics.jsonl").read_text())["train_loss"])
  print(f"optimizer state bytes per parameter byte: {state}")
  assert state[32] == pytest.approx(3.0, rel=1e-3)  # mu, nu, nu_max in float32
  assert state[16] == pytest.approx(1.5, rel=1e-3)
  assert state[8] < 0.85  # 3.20 bytes a parameter in 8-bit codes, the small leaves in float32
  capsys.readouterr()
  workdir = ["--workdir", str(tmp_path / "bits8")]
  assert cifar_main.main([*args, *workdir, "--resume", "--epochs", "1"]) == 2
  assert "state_bits: checkpoint 8, now 32" in capsys.readouterr().err
  adam = ["--optimizer", "adam", "--state-bits", "16", "--workdir", str(tmp_path / "adam")]
  assert cifar_main.main([*args, *adam]) == 2
  assert "--state-bits 16 is not valid for adam" in capsys.readouterr().err
