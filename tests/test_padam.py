"""Padam against the reference rule, Algorithm 1, its limits, and its argument checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import (
  PadamReference,
  initial_params,
  mixed_scale_gradients,
  relative_deviation,
)

import padam_jax

P_VALUES = [0.0, 1 / 16, 1 / 8, 1 / 4, 2 / 5, 1 / 2]
STEPS = 120
# float32 arithmetic against a float64 reference. One step agrees to ~2e-7; over 120
# steps the float32 moments accumulate round-off, which cancellation in m (an average of
# gradients of both signs) amplifies on the smallest updates to ~1e-4 of their size.
TOLERANCE = 2.5e-4


def run_against_reference(tx, reference_for_leaf, lr_at, *, mask=None, steps=STEPS):
  """Runs ``tx`` and one reference per leaf on the same gradients; returns the max deviation."""
  grads = mixed_scale_gradients(steps)
  params = {k: jnp.asarray(v) for k, v in initial_params().items()}
  refs = {k: reference_for_leaf() for k in params}
  state = tx.init(params)
  update = jax.jit(tx.update)
  worst = 0.0
  for t, g in enumerate(grads):
    g = {k: jnp.asarray(v) for k, v in g.items()}
    updates, state = update(g, state, params)
    for k in params:
      decay = True if mask is None else mask[k]
      expected = refs[k].update(g[k], params[k], lr_at(t), decay=decay)
      assert np.all(np.isfinite(np.asarray(updates[k])))
      worst = max(worst, relative_deviation(updates[k], expected))
    params = optax.apply_updates(params, updates)
  return worst


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_padam_matches_reference_rule(p, weight_decay):
  tx = padam_jax.padam(learning_rate=0.1, p=p, weight_decay=weight_decay)
  worst = run_against_reference(tx, lambda: PadamReference(p, wd=weight_decay), lambda t: 0.1)
  assert worst < TOLERANCE, f"p={p}: max relative deviation {worst:.2e}"


@pytest.mark.parametrize("p", [1 / 8, 1 / 2])
def test_padam_weight_decay_mask_matches_reference(p):
  mask = {"a": True, "b": False, "c": True}
  tx = padam_jax.padam(learning_rate=0.1, p=p, weight_decay=1e-2, mask=mask)
  worst = run_against_reference(tx, lambda: PadamReference(p, wd=1e-2), lambda t: 0.1, mask=mask)
  assert worst < TOLERANCE


@pytest.mark.standard_promotion  # optax.linear_schedule mixes int32 and float
def test_padam_callable_mask_and_schedules_match_reference():
  lr = optax.piecewise_constant_schedule(0.1, {40: 0.1, 80: 0.1})
  p = optax.linear_schedule(0.5, 0.125, transition_steps=100)
  mask_fn = lambda params: {k: k != "b" for k in params}  # noqa: E731
  tx = padam_jax.padam(learning_rate=lr, p=p, weight_decay=1e-3, mask=mask_fn)

  class Scheduled(PadamReference):
    def update(self, g, x, lr_now, decay=True):
      self.p = float(p(self.t))  # the count before this update, as Optax schedules
      return super().update(g, x, lr_now, decay)

  worst = run_against_reference(
    tx,
    lambda: Scheduled(0.5, wd=1e-3),
    lambda t: float(lr(t)),
    mask=mask_fn({"a": 0, "b": 0, "c": 0}),
  )
  assert worst < TOLERANCE


@pytest.mark.parametrize("p", [1 / 8, 1 / 4, 1 / 2])
def test_algorithm_1_matches_its_numpy_loop(p):
  tx = padam_jax.padam(learning_rate=0.01, p=p, eps=0.0, bias_correction=False)
  worst = run_against_reference(
    tx, lambda: PadamReference(p, eps=0.0, bias_correction=False), lambda t: 0.01
  )
  assert worst < TOLERANCE


def test_algorithm_1_gives_zero_update_where_no_gradient_was_ever_seen():
  tx = padam_jax.padam(learning_rate=0.1, p=0.125, eps=0.0, bias_correction=False)
  params = jnp.zeros(3)
  state = tx.init(params)
  updates, _ = tx.update(jnp.array([0.0, 1.0, -2.0]), state, params)
  assert float(updates[0]) == 0.0
  assert np.all(np.isfinite(np.asarray(updates)))


def test_p_zero_without_bias_correction_is_heavy_ball_momentum():
  b1, lr = 0.9, 0.1
  tx = padam_jax.padam(learning_rate=lr, p=0.0, b1=b1, bias_correction=False)
  sgdm = optax.sgd(lr * (1 - b1), momentum=b1)
  grads = mixed_scale_gradients(50)
  params = {k: jnp.asarray(v) for k, v in initial_params().items()}
  s1, s2 = tx.init(params), sgdm.init(params)
  for g in grads:
    g = {k: jnp.asarray(v) for k, v in g.items()}
    u1, s1 = tx.update(g, s1, params)
    u2, s2 = sgdm.update(g, s2, params)
    for k in params:
      np.testing.assert_allclose(
        u1[k], u2[k], rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(u2[k])))
      )


@pytest.mark.standard_promotion  # optax.amsgrad raises a float to an int32 power
def test_p_half_matches_pytorch_amsgrad_convention_not_optax():
  # Same gradients; optax.amsgrad takes the max of the bias-corrected v, so the two
  # differ as soon as v shrinks. Padam at p=1/2 must follow the raw-v reference.
  grads = [np.array([1.0], np.float32)] * 5 + [np.array([1e-3], np.float32)] * 5
  ref = PadamReference(0.5)
  tx = padam_jax.padam(learning_rate=0.1, p=0.5)
  params = jnp.zeros(1)
  state = tx.init(params)
  for g in grads:
    expected = ref.update(g, np.zeros(1), 0.1)
    updates, state = tx.update(jnp.asarray(g), state, params)
    np.testing.assert_allclose(updates, expected, rtol=1e-5)
  optax_state = optax.amsgrad(0.1).init(params)
  for g in grads:
    optax_updates, optax_state = optax.amsgrad(0.1).update(jnp.asarray(g), optax_state, params)
  assert abs(float(optax_updates[0]) - float(updates[0])) > 1e-3 * abs(float(updates[0]))


def test_state_is_three_arrays_per_parameter_and_honours_mu_dtype():
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
  state = padam_jax.scale_by_partial_amsgrad(mu_dtype=jnp.bfloat16).init(params)
  assert isinstance(state, padam_jax.ScaleByPartialAmsgradState)
  assert jax.tree.map(lambda x: x.dtype, state.mu) == {"w": jnp.bfloat16, "b": jnp.bfloat16}
  assert jax.tree.map(lambda x: x.dtype, state.nu) == {"w": jnp.float32, "b": jnp.float32}
  assert len(jax.tree.leaves(state)) == 1 + 3 * len(jax.tree.leaves(params))


@pytest.mark.standard_promotion
def test_integer_and_none_leaves_behave_as_optax_amsgrad():
  params = {"w": jnp.ones(3), "i": jnp.arange(3), "n": None}
  grads = {"w": jnp.ones(3), "i": jnp.arange(3), "n": None}
  for tx in (padam_jax.padam(0.1, p=0.5, eps=1e-8), optax.amsgrad(0.1, b2=0.999)):
    updates, _ = tx.update(grads, tx.init(params), params)
    assert updates["n"] is None
    assert updates["i"].dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(updates["i"])))
  tx = padam_jax.padam(0.1, p=0.5)
  updates, _ = tx.update(grads, tx.init(params), params)
  # One step of AMSGrad is -lr * sign(g) up to eps.
  np.testing.assert_allclose(updates["i"], -0.1 * np.sign(np.arange(3)), rtol=1e-5)


BAD_INPUTS = [
  (dict(p=0.6), "p", "0.6"),
  (dict(p=-0.1), "p", "-0.1"),
  (dict(p=float("nan")), "p", "nan"),
  (dict(p=float("inf")), "p", "inf"),
  (dict(b1=1.0), "b1", "1.0"),
  (dict(b1=-0.5), "b1", "-0.5"),
  (dict(b2=1.5), "b2", "1.5"),
  (dict(b2=float("nan")), "b2", "nan"),
  (dict(eps=-1e-8), "eps", "-1e-08"),
  (dict(weight_decay=-5e-4), "weight_decay", "-0.0005"),
]


@pytest.mark.parametrize(("kwargs", "name", "shown"), BAD_INPUTS)
def test_bad_input_is_rejected_when_built_with_a_clear_message(kwargs, name, shown):
  with pytest.raises(ValueError, match=rf"^{name} must be .* got {shown}") as excinfo:
    padam_jax.padam(**kwargs)
  assert "[" in str(excinfo.value) or "(" in str(excinfo.value)  # the valid range is named


@pytest.mark.parametrize(
  ("kwargs", "name", "shown"), [b for b in BAD_INPUTS if b[1] != "weight_decay"]
)
def test_bad_input_is_rejected_by_the_transformation_too(kwargs, name, shown):
  with pytest.raises(ValueError, match=rf"^{name} must be"):
    padam_jax.scale_by_partial_amsgrad(**kwargs)


def test_bool_hyperparameter_is_a_type_error():
  with pytest.raises(TypeError, match="bool"):
    padam_jax.padam(p=True)


def test_edge_values_are_accepted():
  for kwargs in (dict(p=0.0), dict(p=0.5), dict(b1=0.0, b2=0.0), dict(eps=0.0)):
    padam_jax.padam(**kwargs)


def test_factory_does_no_jax_computation():
  # Building the optimizer must work before jax.distributed.initialize: no arrays.
  with jax.transfer_guard("disallow"), jax.log_compiles(False):
    padam_jax.padam(learning_rate=optax.constant_schedule(0.1), p=np.float32(0.125))
