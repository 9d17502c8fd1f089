"""The transformer language model (examples/ptb/transformer.py) and the registry's ``lm`` task.

The model: causality, the attention against a NumPy reference, learning a repeated window, the
weight-decay mask. The task's optimizers against Optax's AdamW, PadamW and a NumPy SGD-M with
decoupled decay. The trainer: steps per call, a mesh, a signal and resumption, compact state and
bfloat16, the window and its errors.
"""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_preemption import assert_same_metrics, signal_at_call
from test_ptb import PATTERN, write_corpus

import padam_jax
from examples import cli, metrics, optimizers
from examples.ptb import __main__ as ptb_main
from examples.ptb import input_pipeline, models, train, transformer

# optax's Adam and warmup-cosine schedule mix Python floats with the int32 step (see test_training.py).
pytestmark = pytest.mark.standard_promotion

VOCAB = 11


@nnx.jit
def forward(model, tokens):
  return model(tokens)[0]


@pytest.fixture(scope="module")
def tiny():
  return models.create_model("transformer-tiny", VOCAB, rngs=nnx.Rngs(0))


def test_a_later_token_changes_no_earlier_logit(tiny):
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, VOCAB)
  logits = forward(tiny, tokens)
  assert logits.shape == (2, 12, VOCAB) and logits.dtype == jnp.float32
  for t in (0, 5, 10):
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % VOCAB)
    other = forward(tiny, changed)
    np.testing.assert_array_equal(other[:, : t + 1], logits[:, : t + 1])
    assert not np.allclose(other[:, t + 1 :], logits[:, t + 1 :])


def numpy_forward(model, tokens):
  """The model from its equations in float64 (LayerNorm eps 1e-6, tanh-approximated GELU)."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(model)))

  def norm(x, ln):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * ln["scale"] + ln["bias"]

  def dense(x, d):
    return x @ d["kernel"] + d["bias"]

  def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

  spec = model.spec
  time, heads = tokens.shape[1], spec.num_heads
  x = p["embed"]["embedding"][tokens] + p["position"][:time]
  causal = np.tril(np.ones((time, time), bool))
  for block in p["blocks"].values():
    q, k, v = np.split(dense(norm(x, block["ln1"]), block["qkv"]), 3, axis=-1)
    split = lambda a: a.reshape(*a.shape[:2], heads, -1)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(causal, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape)
    x = x + dense(attended, block["proj"])
    x = x + dense(gelu(dense(norm(x, block["ln2"]), block["fc"])), block["out"])
  return norm(x, p["ln_f"]) @ p["embed"]["embedding"].T


def test_the_model_matches_its_equations_in_numpy(tiny):
  # Larger weights than the initialization's, so that attention is far from uniform.
  model = models.create_model("transformer-tiny", VOCAB, rngs=nnx.Rngs(3))
  state = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(4), len(jax.tree.leaves(state))))
  nnx.update(model, jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape) * 0.3, state))
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (2, 9), 0, VOCAB))
  np.testing.assert_allclose(
    forward(model, jnp.asarray(tokens)), numpy_forward(model, tokens), rtol=2e-4, atol=2e-4
  )


def test_the_loss_falls_on_a_repeated_window():
  model = models.create_model("transformer-tiny", VOCAB, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  tokens = jax.random.randint(jax.random.key(5), (4, 13), 0, VOCAB)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      logits = model(tokens[:, :-1])[0]
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(60)]
  assert losses[0] > 2.0  # about log(11) = 2.4 at the start
  assert losses[-1] < 0.1 * losses[0]


def test_decay_mask_selects_the_dense_kernels_only(tiny):
  mask = transformer.decay_mask(nnx.state(tiny, nnx.Param))
  flat = {
    "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): value
    for path, value in jax.tree_util.tree_leaves_with_path(mask)
  }
  decayed = sorted(name for name, value in flat.items() if value)
  assert len(decayed) == 8 and all(name.endswith("kernel/value") for name in decayed)
  assert not flat["embed/embedding/value"] and not flat["position/value"]
  assert not any(value for name, value in flat.items() if "ln" in name or "bias" in name)


def test_window_longer_than_the_context_is_refused_before_the_data(tmp_path):
  config = train.Config(model="transformer-tiny", bptt=17, workdir=str(tmp_path / "w"))
  with pytest.raises(ValueError, match="--bptt 17 is not valid for a transformer of context 16"):
    train.train_and_evaluate(config)  # no corpus and no data folder: the check comes first
  with pytest.raises(ValueError, match="always ties"):
    models.get_spec("transformer-tiny", tie_weights=False)


def test_windows_are_cut_without_overlap_and_shuffled_every_epoch():
  rng = np.random.default_rng(0)
  vocab = tuple(f"w{i}" for i in range(20))
  stream = rng.integers(0, 20, 401).astype(np.int32)
  corpus = input_pipeline.Corpus(vocab, stream, stream[:50], stream[:50])
  config = train.Config(model="transformer-tiny", batch_size=4, bptt=8, workdir="unused")
  task = train.make_task(config, corpus)
  assert isinstance(task, train.TransformerTask) and task.init_carry(4) is None
  assert task.steps_per_epoch == 50 // 4 and task.train_size == 48
  windows = {tuple(stream[8 * w : 8 * w + 9]) for w in range(50)}  # 400 pairs: 50 windows
  seen = []
  for epoch in (1, 2):
    batches = list(task.train_batches(epoch, jax.random.key(epoch)))
    rows = [np.concatenate([i, t[-1:]]) for b in batches for i, t in zip(*b.values(), strict=True)]
    for batch in batches:
      np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert all(tuple(row) in windows for row in rows) and len({tuple(r) for r in rows}) == 48
    seen.append([tuple(r) for r in rows])
  assert seen[0] != seen[1]


# The registry's lm task.

PARAMS = {"w": jnp.arange(12.0).reshape(3, 4) / 10 - 0.5, "b": jnp.array([0.3, -0.2, 0.1, 0.4])}
MASK = {"w": True, "b": False}
STEPS, TOTAL = 12, 20


def gradients(t):
  return jax.tree.map(lambda x: jnp.sin(3.0 * x + 0.7 * t) + 0.1, PARAMS)


def run(tx, steps=STEPS):
  params, state = PARAMS, tx.init(PARAMS)
  for t in range(steps):
    updates, state = tx.update(gradients(t), state, params)
    params = optax.apply_updates(params, updates)
  return params


def lm(name, **overrides):
  return optimizers.make_optimizer(
    name, "lm", steps_per_epoch=TOTAL, epochs=1, weight_decay_mask=MASK, **overrides
  )


def test_lm_schedule_warms_up_then_decays_to_a_tenth():
  setup = lm("adamw", learning_rate=0.01)
  rates = np.array([float(setup.learning_rate(t)) for t in range(TOTAL + 1)])
  # 10% of 20 steps of warmup: 0, 0.005, then the peak at step 2, then a cosine down to 0.001.
  np.testing.assert_allclose(rates[:3], [0.0, 0.005, 0.01], rtol=1e-6)
  t = np.arange(2, TOTAL + 1)
  cosine = 0.001 + 0.5 * (0.01 - 0.001) * (1 + np.cos(np.pi * (t - 2) / (TOTAL - 2)))
  np.testing.assert_allclose(rates[2:], cosine, rtol=1e-5)
  hp = setup.hyperparams
  assert (hp["schedule"], hp["warmup_steps"], hp["b2"], hp["weight_decay"]) == (
    "warmup_cosine",
    2,
    0.95,
    1e-4,
  )
  assert hp["weight_decay_style"] == "decoupled, masked"


@pytest.mark.parametrize("name", ["adamw", "padamw"])
def test_lm_adamw_and_padamw_are_optax_adamw_and_padam_jax_padamw(name):
  decay = 0.05  # large enough to show in 12 steps
  setup = lm(name, learning_rate=0.02, weight_decay=decay)
  schedule = optimizers.warmup_cosine_schedule(0.02, TOTAL)
  if name == "adamw":
    reference = optax.adamw(schedule, b2=0.95, weight_decay=decay / 0.02, mask=MASK)
  else:
    reference = padam_jax.padamw(schedule, p=0.125, b2=0.95, weight_decay=decay / 0.02, mask=MASK)
  ours, theirs = run(setup.tx), run(reference)
  for key in PARAMS:
    np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-7)
  assert not np.allclose(ours["w"], run(lm(name, learning_rate=0.02, weight_decay=0.0).tx)["w"])


def test_lm_sgdm_decays_decoupled_against_numpy():
  lr0, decay, mu = 0.3, 0.05, 0.9
  setup = lm("sgdm", learning_rate=lr0, weight_decay=decay)
  rates = [float(setup.learning_rate(t)) for t in range(STEPS)]
  params = {k: np.asarray(v, np.float64) for k, v in PARAMS.items()}
  buffers = {k: np.zeros_like(v) for k, v in params.items()}
  for t in range(STEPS):
    grads = gradients(t)
    for k in params:
      buffers[k] = mu * buffers[k] + np.asarray(grads[k], np.float64)
      shrink = rates[t] / lr0 * decay * params[k] if MASK[k] else 0.0
      params[k] = params[k] - rates[t] * buffers[k] - shrink
  ours = run(setup.tx)
  for k in params:
    np.testing.assert_allclose(ours[k], params[k], rtol=2e-5, atol=1e-6)


def test_lm_adam_and_padam_decay_nothing():
  for name in ("adam", "padam"):
    hp = lm(name).hyperparams
    assert hp["weight_decay"] == 0.0 and "weight_decay_style" not in hp


# The trainer, on a one-layer model (its MLP's 32 x 128 kernel is split by fsdp).

TEST_SPEC = transformer.TransformerSpec(num_layers=1, width=32, num_heads=2, context=8)


def without_timing(history):
  return [
    {k: v for k, v in r.items() if "seconds" not in k and "per_second" not in k} for r in history
  ]


def trained(args, workdir, *flags):
  assert ptb_main.main([*args, *flags, "--workdir", str(workdir)]) == cli.EXIT_OK
  return without_timing(metrics.read_metrics(workdir))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The trainer's arguments and the metrics of their run on one device, a step a call."""
  folder = tmp_path_factory.mktemp("transformer")
  write_corpus(folder, PATTERN * 30, PATTERN * 2, PATTERN * 2)
  # 360 tokens: 44 windows of 8, 5 steps of 8 windows an epoch.
  args = ["--model", "test-transformer", "--batch-size", "8", "--epochs", "2", "--no-progress"]
  args += ["--optimizer", "padamw", "--lr", "0.05", "--eval-batch-size", "8", "--no-xnnpack"]
  args += ["--data-dir", str(folder)]
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(models.MODELS, "test-transformer", TEST_SPEC)
    patch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # main() may add XNNPACK's
    history = trained(args, folder / "one", "--devices", "1")
  return args, history, folder / "one"


@pytest.fixture
def args(reference, monkeypatch):
  monkeypatch.setitem(models.MODELS, "test-transformer", TEST_SPEC)
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
  return reference[0]


def test_steps_per_call_and_a_mesh_give_the_one_device_run(tmp_path, args, reference):
  one = reference[1]
  assert [r["step"] for r in one] == [5, 10]
  assert one[1]["train_loss"] < one[0]["train_loss"]
  assert metrics.read_run(reference[2])["optimizer"]["task"] == "lm"
  eight_a_call = trained(args, tmp_path / "k8", "--devices", "1", "--steps-per-call", "8")
  assert eight_a_call == one  # the same numbers, to the bit
  # 8 host devices, the parameters and state split over fsdp=4: the bound docs/trainers.md states.
  mesh = trained(args, tmp_path / "mesh", "--mesh", "data=2,fsdp=4", "--steps-per-call", "8")
  assert len(metrics.read_run(tmp_path / "mesh")["devices"]) == 8
  for a, b in zip(mesh, one, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)


def test_a_run_stopped_by_sigterm_resumes_to_the_uninterrupted_run(
  tmp_path, args, reference, monkeypatch
):
  args = [*args, "--devices", "1", "--steps-per-call", "2"]
  restore = signal_at_call(monkeypatch, 4, signal.SIGTERM)  # the first call of epoch 2
  assert ptb_main.main([*args, "--workdir", str(tmp_path / "run")]) == cli.EXIT_PREEMPTED
  restore()
  assert trained(args, tmp_path / "run", "--resume") == reference[1]
  assert_same_metrics(metrics.read_metrics(tmp_path / "run"), metrics.read_metrics(reference[2]))
  resumptions = metrics.read_run(tmp_path / "run")["resumptions"]
  assert resumptions == [{"after_epoch": 1, "steps_into_epoch": 2, "changed": {}}]


def test_compact_state_and_bfloat16_train(tmp_path, args, reference):
  flags = ["--devices", "1", "--state-bits", "16", "--dtype", "bfloat16"]
  history = trained(args, tmp_path / "run", *flags)
  assert all(np.isfinite(r["valid_ppl"]) for r in history)
  assert history[1]["train_loss"] < history[0]["train_loss"]
  # Close to the float32 run, not equal to it.
  assert history[1]["valid_ppl"] != reference[1][1]["valid_ppl"]
  np.testing.assert_allclose(history[1]["valid_ppl"], reference[1][1]["valid_ppl"], rtol=0.1)
