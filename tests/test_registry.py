"""The optimizer registry (examples/optimizers.py): names, the paper's values, schedule, AdamW.

The Optax battery runs over every registry optimizer in tests/test_battery.py.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import PadamReference

from examples import optimizers

BUILD = dict(steps_per_epoch=391, epochs=200, batch_size=128, train_size=50_000)


def test_names_and_tasks():
  assert optimizers.PAPER_OPTIMIZERS == (
    "sgdm",
    "adam",
    "amsgrad",
    "adamw",
    "yogi",
    "adabound",
    "padam",
  )
  assert optimizers.TASKS == ("cifar10", "ptb2", "ptb3", "lm")
  assert set(optimizers.PAPER_OPTIMIZERS) < set(optimizers.NAMES)
  for extra in (
    "amsbound",
    "partial_adam",
    "partial_rmsprop",
    "partial_adagrad",
    "partial_adamax",
    "partial_adadelta",
    "padamw",
  ):
    assert extra in optimizers.NAMES
  assert len(set(optimizers.NAMES)) == len(optimizers.NAMES)


@pytest.mark.standard_promotion  # optax.adam, adamw and yogi mix int32 and float
@pytest.mark.parametrize("task", ["cifar10", "ptb2", "ptb3"])
@pytest.mark.parametrize("name", optimizers.NAMES)
def test_every_optimizer_builds_steps_and_logs_json(name, task):
  setup = optimizers.make_optimizer(name, task, **BUILD)
  params = {"w": jnp.array([0.5, -1.0, 2.0])}
  updates, _ = setup.tx.update({"w": jnp.array([0.1, 0.2, -0.3])}, setup.tx.init(params), params)
  assert np.all(np.isfinite(np.asarray(updates["w"])))
  assert np.all(np.asarray(updates["w"]) != 0)
  logged = json.loads(json.dumps(setup.hyperparams))
  assert logged["optimizer"] == name
  assert logged["task"] == task
  assert logged["total_steps"] == 391 * 200


def test_unknown_name_lists_the_valid_ones():
  with pytest.raises(ValueError, match="unknown optimizer 'adagrad'") as excinfo:
    optimizers.make_optimizer("adagrad", "cifar10", **BUILD)
  for name in optimizers.NAMES:
    assert name in str(excinfo.value)


def test_unknown_task_lists_the_valid_ones():
  with pytest.raises(ValueError, match="unknown task 'imagenet'") as excinfo:
    optimizers.make_optimizer("padam", "imagenet", **BUILD)
  for task in optimizers.TASKS:
    assert task in str(excinfo.value)


def test_unknown_override_lists_the_valid_keys():
  with pytest.raises(ValueError, match=r"unknown hyperparameter.*momentum.*'padam'") as excinfo:
    optimizers.make_optimizer("padam", "cifar10", momentum=0.9, **BUILD)
  for key in ("learning_rate", "p", "b1", "b2", "eps", "weight_decay"):
    assert key in str(excinfo.value)


@pytest.mark.parametrize("bad", [dict(steps_per_epoch=0), dict(epochs=-1), dict(epochs=2.5)])
def test_bad_step_counts_are_rejected(bad):
  with pytest.raises(ValueError, match="must be a positive int"):
    optimizers.make_optimizer("sgdm", "cifar10", **{**BUILD, **bad})


# Section 5 of the paper, transcribed independently of the registry's table.
PAPER = {
  ("cifar10", "sgdm"): dict(learning_rate=0.1, momentum=0.9),
  ("cifar10", "adam"): dict(learning_rate=1e-3, b1=0.9, b2=0.99),
  ("cifar10", "amsgrad"): dict(learning_rate=1e-3, b1=0.9, b2=0.99),
  ("cifar10", "adamw"): dict(learning_rate=1e-3, b2=0.999, weight_decay_normalized=0.025),
  ("cifar10", "yogi"): dict(learning_rate=1e-3, b2=0.999, eps=1e-3),
  ("cifar10", "adabound"): dict(learning_rate=1e-3, final_lr=0.1, b2=0.999),
  ("cifar10", "padam"): dict(learning_rate=0.1, p=0.125, b2=0.999),
  ("ptb2", "sgdm"): dict(learning_rate=1.0, momentum=0.9),
  ("ptb2", "adam"): dict(learning_rate=1e-3, b2=0.999),
  ("ptb2", "amsgrad"): dict(learning_rate=1e-3, b2=0.999),
  ("ptb2", "adamw"): dict(learning_rate=1e-3, weight_decay_normalized=4e-4),
  ("ptb2", "yogi"): dict(learning_rate=0.01, eps=1e-3),
  ("ptb2", "adabound"): dict(learning_rate=1e-3, final_lr=10.0),
  ("ptb2", "padam"): dict(learning_rate=0.01, p=0.4),
  ("ptb3", "sgdm"): dict(learning_rate=10.0, momentum=0.9),
  ("ptb3", "yogi"): dict(learning_rate=0.1),
  ("ptb3", "adabound"): dict(final_lr=100.0),
  ("ptb3", "padam"): dict(learning_rate=1.0, p=0.2),
}


@pytest.mark.parametrize(("task", "name"), sorted(PAPER))
def test_paper_hyperparameters(task, name):
  logged = optimizers.make_optimizer(name, task, **BUILD).hyperparams
  for key, value in PAPER[task, name].items():
    assert logged[key] == pytest.approx(value, rel=1e-12), key


def test_coupled_l2_on_cifar_only():
  for name in ("sgdm", "adam", "amsgrad", "yogi", "adabound", "padam"):
    assert optimizers.make_optimizer(name, "cifar10", **BUILD).hyperparams["weight_decay"] == 5e-4
    assert optimizers.make_optimizer(name, "ptb2", **BUILD).hyperparams["weight_decay"] == 0.0


@pytest.mark.parametrize(
  ("steps_per_epoch", "epochs"), [(391, 200), (10, 20), (1, 3), (1, 1), (7, 1)]
)
def test_schedule_decays_at_half_and_three_quarters(steps_per_epoch, epochs):
  total = steps_per_epoch * epochs
  setup = optimizers.make_optimizer(
    "padam", "cifar10", steps_per_epoch=steps_per_epoch, epochs=epochs
  )
  first, second = int(0.5 * total), int(0.75 * total)
  assert setup.hyperparams["decay_boundaries"] == (
    [[first, 0.1 * 0.1]] if first == second else [[first, 0.1], [second, 0.1]]
  )
  for step in sorted({0, first - 1, first, second - 1, second, total - 1, total + 5}):
    if step < 0:
      continue
    expected = 0.1 * (0.1 if step >= first else 1.0) * (0.1 if step >= second else 1.0)
    assert float(setup.learning_rate(step)) == pytest.approx(expected, rel=1e-6), step


def test_schedule_milestones_for_the_paper_run():
  schedule = optimizers.make_optimizer("sgdm", "cifar10", **BUILD).learning_rate
  # epochs 100 and 150 of 200 at 391 steps each: steps 39,100 and 58,650.
  assert float(schedule(39_099)) == pytest.approx(0.1)
  assert float(schedule(39_100)) == pytest.approx(0.01)
  assert float(schedule(58_649)) == pytest.approx(0.01)
  assert float(schedule(58_650)) == pytest.approx(0.001)


def test_learning_rate_and_overrides_are_used_and_logged():
  setup = optimizers.make_optimizer(
    "padam", "cifar10", learning_rate=0.05, p=0.25, weight_decay=0.0, **BUILD
  )
  assert setup.hyperparams["learning_rate"] == 0.05
  assert setup.hyperparams["p"] == 0.25
  assert float(setup.learning_rate(0)) == pytest.approx(0.05)
  # The optimizer is the one logged: one step against the reference rule at p = 1/4.
  params = jnp.array([0.5, -1.0, 2.0])
  g = jnp.array([0.1, -0.2, 3.0])
  updates, _ = setup.tx.update(g, setup.tx.init(params), params)
  expected = PadamReference(0.25).update(np.asarray(g), np.asarray(params), 0.05)
  np.testing.assert_allclose(updates, expected, rtol=1e-5)


def test_adamw_normalized_weight_decay_value():
  logged = optimizers.make_optimizer("adamw", "cifar10", **BUILD).hyperparams
  expected = 0.025 * math.sqrt(128 / (50_000 * 200))
  assert logged["weight_decay"] == pytest.approx(expected, rel=1e-12)
  assert logged["weight_decay"] == pytest.approx(8.944e-5, rel=1e-3)  # the magnitude, by hand
  ptb = optimizers.make_optimizer(
    "adamw", "ptb2", steps_per_epoch=10, epochs=200, batch_size=20, train_size=46_479
  ).hyperparams
  assert ptb["weight_decay"] == pytest.approx(4e-4 * math.sqrt(20 / (46_479 * 200)), rel=1e-12)


@pytest.mark.standard_promotion  # optax.adamw mixes int32 and float
def test_adamw_decay_follows_the_schedule_multiplier():
  # Zero gradients leave only the decoupled decay: x <- x - (lr_t / lr_0) * lambda * x.
  setup = optimizers.make_optimizer(
    "adamw", "cifar10", steps_per_epoch=2, epochs=4, batch_size=128, train_size=50_000
  )
  lam = setup.hyperparams["weight_decay"]
  x = np.array([1.0, -2.0, 3.0], np.float32)
  params = jnp.asarray(x)
  state = setup.tx.init(params)
  for step in range(8):
    updates, state = setup.tx.update(jnp.zeros(3), state, params)
    multiplier = (0.1 if step >= 4 else 1.0) * (0.1 if step >= 6 else 1.0)
    np.testing.assert_allclose(updates, -multiplier * lam * x, rtol=1e-5)


def test_adamw_needs_sizes_unless_weight_decay_is_given():
  with pytest.raises(ValueError, match="batch_size and train_size"):
    optimizers.make_optimizer("adamw", "cifar10", steps_per_epoch=10, epochs=2)
  setup = optimizers.make_optimizer(
    "adamw", "cifar10", steps_per_epoch=10, epochs=2, weight_decay=1e-4
  )
  assert setup.hyperparams["weight_decay"] == 1e-4


def test_sgdm_is_pytorch_sgd_with_coupled_l2_and_the_schedule():
  setup = optimizers.make_optimizer("sgdm", "cifar10", steps_per_epoch=5, epochs=4)
  rng = np.random.default_rng(0)
  x = rng.standard_normal(4).astype(np.float32)
  params, state = jnp.asarray(x), setup.tx.init(jnp.asarray(x))
  buf, x64 = np.zeros(4), x.astype(np.float64)
  for step in range(20):
    g = rng.standard_normal(4).astype(np.float32)
    lr = 0.1 * (0.1 if step >= 10 else 1.0) * (0.1 if step >= 15 else 1.0)
    buf = 0.9 * buf + (g + 5e-4 * x64)
    x64 = x64 - lr * buf
    updates, state = setup.tx.update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params, x64, rtol=1e-5, atol=1e-6)


def test_amsgrad_is_the_max_of_the_raw_second_moment():
  setup = optimizers.make_optimizer(
    "amsgrad", "cifar10", steps_per_epoch=100, epochs=1, weight_decay=0.0
  )
  ref = PadamReference(0.5, b2=0.99)
  params = jnp.zeros(1)
  state = setup.tx.init(params)
  for g in [np.array([1.0], np.float32)] * 5 + [np.array([1e-3], np.float32)] * 10:
    updates, state = setup.tx.update(jnp.asarray(g), state, params)
    np.testing.assert_allclose(updates, ref.update(g, np.zeros(1), 1e-3), rtol=1e-5)


def test_padam_annealed_against_the_reference_with_p_and_rate_per_step():
  # 40 steps, decays after 20 and 30; p falls linearly 1/2 -> 1/8 over the first 10 steps while
  # the rate rises log-linearly from lr/100 to lr: written out here in NumPy, step by step.
  lr, total, ramp = 0.3, 40, 10
  setup = optimizers.make_optimizer(
    "padam_annealed", "cifar10", steps_per_epoch=10, epochs=4, learning_rate=lr
  )
  assert setup.hyperparams["anneal_steps"] == ramp
  rng = np.random.default_rng(0)
  params = jnp.asarray(rng.normal(size=4), jnp.float32)
  state = setup.tx.init(params)
  ref = PadamReference(0.5, wd=5e-4)
  for t in range(total):
    s = min(t / ramp, 1.0)
    rate = lr * 0.01 ** (1 - s) * (0.1 if t >= 20 else 1.0) * (0.1 if t >= 30 else 1.0)
    ref.p = 0.5 + (0.125 - 0.5) * s
    assert float(setup.learning_rate(t)) == pytest.approx(rate, rel=1e-5)
    g = rng.normal(size=4).astype(np.float32) * 10.0 ** rng.integers(-4, 1)
    updates, state = setup.tx.update(jnp.asarray(g), state, params)
    np.testing.assert_allclose(updates, ref.update(g, np.asarray(params), rate), rtol=2e-5)
    params = params + updates


def test_padamw_normalized_decay_and_padam_without_bias_correction():
  logged = optimizers.make_optimizer(
    "padamw", "cifar10", **{**BUILD, "learning_rate": 0.3}, weight_decay_normalized=0.025
  ).hyperparams
  # padamw multiplies its decay by lr_t: lambda_norm sqrt(b / (n T)) / lr_0.
  assert logged["weight_decay"] == pytest.approx(0.025 * math.sqrt(128 / 50_000 / 200) / 0.3)
  assert optimizers.make_optimizer("padamw", "cifar10", **BUILD).hyperparams["weight_decay"] == 5e-4
  setup = optimizers.make_optimizer(
    "padam", "cifar10", steps_per_epoch=10, epochs=4, bias_correction=False
  )
  params, g = jnp.array([0.5, -1.0, 2.0]), np.array([0.1, -0.2, 3.0], np.float32)
  updates, _ = setup.tx.update(jnp.asarray(g), setup.tx.init(params), params)
  ref = PadamReference(0.125, wd=5e-4, bias_correction=False)
  np.testing.assert_allclose(updates, ref.update(g, np.asarray(params), 0.1), rtol=1e-5)


def test_mu_dtype_keeps_the_first_moment_in_that_dtype():
  with_mu = [n for n in optimizers.NAMES if "mu_dtype" in optimizers.paper_hyperparams(n, "ptb2")]
  assert set(optimizers.NAMES) - set(with_mu) == {
    "yogi",
    "partial_rmsprop",
    "partial_adagrad",
    "partial_adadelta",
  }
  params = {"w": jnp.zeros(3)}
  for name in with_mu:
    assert optimizers.make_optimizer(name, "ptb2", **BUILD).hyperparams["mu_dtype"] is None
    for value in ("bfloat16", jnp.bfloat16):
      setup = optimizers.make_optimizer(name, "ptb2", mu_dtype=value, **BUILD)
      assert setup.hyperparams["mu_dtype"] == "bfloat16"
      dtypes = [x.dtype for x in jax.tree.leaves(setup.tx.init(params)) if x.ndim]
      assert jnp.bfloat16 in dtypes, (name, dtypes)
  for bad in ("float64", "int8", 3, True):
    with pytest.raises(ValueError, match=r"mu_dtype .* is not valid for 'padam'; expected float32"):
      optimizers.make_optimizer("padam", "cifar10", mu_dtype=bad, **BUILD)


@pytest.mark.standard_promotion  # optax.adam's bias correction mixes int and float
@pytest.mark.parametrize("split_state", [False, True])
def test_8bit_state_is_updated_in_slices_unless_the_state_is_split(split_state):
  # A parameter of more than 2**22 elements: sliced by default, whole when the state is split
  # over devices (the trainers' --mesh with fsdp > 1), where slices of rows would cross devices.
  setup = optimizers.make_optimizer(
    "adam", "cifar10", **BUILD, state_bits=8, split_state=split_state
  )
  params = {"w": jax.ShapeDtypeStruct((4096, 1040), jnp.float32)}
  state = jax.eval_shape(setup.tx.init, params)
  jaxpr = jax.make_jaxpr(setup.tx.update)(params, state, params)
  assert ("dynamic_update_slice" in str(jaxpr)) == (not split_state)
