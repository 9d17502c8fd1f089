"""Inputs beyond float32 training: no params, complex parameters, half precision, bad ``p``."""

from __future__ import annotations

import cmath

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import padam_jax

# name -> factory(**overrides), every alias with its weight decay off.
ALIASES = {
  "padam": padam_jax.padam,
  "padamw": lambda **kw: padam_jax.padamw(**{"weight_decay": 0.0, **kw}),
  "partial_adam": padam_jax.partial_adam,
  "partial_adamax": padam_jax.partial_adamax,
  "partial_rmsprop": padam_jax.partial_rmsprop,
  "partial_rmsprop_momentum": lambda **kw: padam_jax.partial_rmsprop(momentum=0.9, **kw),
  "partial_adagrad": padam_jax.partial_adagrad,
  "partial_adadelta": padam_jax.partial_adadelta,
  "adabound": padam_jax.adabound,
  "amsbound": padam_jax.amsbound,
}
FAMILY = sorted(set(ALIASES) - {"adabound", "amsbound"})  # the aliases that take p

GRADS = [np.array([0.5, -2.0, 0.0], np.float32), np.array([0.1, 3.0, 0.0], np.float32)]
PARAMS = np.array([1.0, -1.0, 2.0], np.float32)


def run(tx, grads, params, *, pass_params=True):
  """Updates of ``tx`` over ``grads`` at fixed ``params`` (eager, no recompilation)."""
  state = tx.init(params)
  out = []
  for g in grads:
    updates, state = tx.update(g, state, params) if pass_params else tx.update(g, state)
    out.append(updates)
  return out, state


# Without params.


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_alias_without_weight_decay_needs_no_params(name):
  tx = ALIASES[name]()
  grads = [jnp.asarray(g) for g in GRADS]
  with_params, _ = run(tx, grads, jnp.asarray(PARAMS))
  without, _ = run(tx, grads, jnp.asarray(PARAMS), pass_params=False)
  for a, b in zip(with_params, without, strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["padam", "padamw", "partial_adagrad", "adabound"])
def test_masked_zero_weight_decay_needs_no_params(name):
  tx = ALIASES[name](weight_decay=0.0, mask={"w": True, "b": False})
  params = {"w": jnp.ones(2), "b": jnp.ones(1)}
  updates, _ = tx.update({"w": jnp.ones(2), "b": jnp.ones(1)}, tx.init(params))
  assert np.all(np.isfinite(updates["w"]))


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_weight_decay_without_params_is_a_clear_error(name):
  tx = ALIASES[name](weight_decay=1e-3)
  with pytest.raises(ValueError, match=r"weight_decay.*params"):
    tx.update(jnp.ones(3), tx.init(jnp.ones(3)))


# Complex parameters.


def complex_amsgrad_reference(grads, p, lr=0.1, b1=0.9, b2=0.999, eps=1e-8):
  """The reference rule written for complex gradients: real second moments of ``|g|^2``."""
  m, v, v_max, out = 0j, 0.0, 0.0, []
  for t, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * abs(g) ** 2
    v_max = max(v_max, v)
    c = np.sqrt(1 - b2**t) / (1 - b1**t)
    out.append(-lr * c * m / (np.sqrt(v_max) + eps) ** (2 * p))
  return out


@pytest.mark.parametrize("p", [0.125, 0.5])
def test_padam_on_complex_parameters_follows_the_complex_reference(p):
  grads = [0.1 + 0.2j, -0.3 + 0.05j, 1e-3 - 2e-3j, 0.2 + 0.0j]
  tx = padam_jax.padam(0.1, p=p)
  updates, state = run(
    tx, [jnp.array([g], jnp.complex64) for g in grads], jnp.array([1 + 1j], jnp.complex64)
  )
  assert state[1].nu.dtype == jnp.float32 and state[1].nu_max.dtype == jnp.float32
  assert updates[0].dtype == jnp.complex64
  expected = complex_amsgrad_reference(grads, p)
  np.testing.assert_allclose([complex(u[0]) for u in updates], expected, rtol=1e-5)


@pytest.mark.standard_promotion  # optax.amsgrad mixes float32 and complex64
def test_padam_first_complex_step_is_optax_amsgrad():
  # At p = 1/2 the first step of both is -lr * g / |g| (up to where eps enters).
  params, g = jnp.array([1 + 1j], jnp.complex64), jnp.array([0.1 + 0.2j], jnp.complex64)
  ours, _ = padam_jax.padam(0.1, p=0.5).update(g, padam_jax.padam(0.1, p=0.5).init(params))
  tx = optax.amsgrad(0.1)
  theirs, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5)
  assert abs(complex(ours[0])) == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_complex_step_turns_with_the_gradient(name):
  # Every rule scales g by a function of |g| only: a phase on g and x turns the step.
  phase = cmath.exp(0.7j)
  tx = ALIASES[name](weight_decay=1e-2)
  real, _ = run(tx, [jnp.asarray(g) for g in GRADS], jnp.asarray(PARAMS))
  turned, state = run(
    tx,
    [jnp.asarray(g * phase, jnp.complex64) for g in GRADS],
    jnp.asarray(PARAMS * phase, jnp.complex64),
  )
  for r, c in zip(real, turned, strict=True):
    assert c.dtype == jnp.complex64
    np.testing.assert_allclose(c, np.asarray(r) * phase, rtol=2e-5, atol=1e-7)
  second_moments = [x for x in jax.tree.leaves(state) if x.ndim and x.dtype != jnp.complex64]
  assert second_moments, "no real moment in the state"


# Half precision.


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("name", sorted(ALIASES))
def test_zero_gradient_in_half_precision_gives_a_zero_update(name, dtype):
  tx = ALIASES[name]()
  params = jnp.ones(3, dtype)
  updates, _ = run(tx, [jnp.zeros(3, dtype)] * 2, params)
  for u in updates:
    assert u.dtype == dtype
    np.testing.assert_array_equal(np.asarray(u, np.float32), 0.0)


@pytest.mark.parametrize("eps", [1e-7, 1e-5])
def test_small_eps_in_float16_gives_finite_steps(eps):
  # 1/eps overflows float16; the power is taken in float32.
  tx = padam_jax.padam(0.1, p=0.5, eps=eps)
  updates, _ = run(tx, [jnp.array([0.0, 1e-3, 1.0], jnp.float16)] * 2, jnp.ones(3, jnp.float16))
  for u in updates:
    assert np.all(np.isfinite(np.asarray(u, np.float32)))
    assert float(u[0]) == 0.0


# The exponent p.


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize(
  ("p", "error"),
  [
    (np.array([0.1, 0.2]), ValueError),
    ([0.1, 0.2], ValueError),
    (np.array([0.1, 0.7]), ValueError),
    ("a", TypeError),
    (None, TypeError),
    (1 + 0j, TypeError),
  ],
)
def test_p_that_is_not_one_number_is_rejected_when_built(name, p, error):
  with pytest.raises(error, match=r"^p must be"):
    ALIASES[name](p=p)


@pytest.mark.parametrize("name", FAMILY)
def test_p_as_a_scalar_array_is_accepted(name):
  tx = ALIASES[name](p=np.array(0.25))
  updates, _ = run(tx, [jnp.asarray(GRADS[0])], jnp.asarray(PARAMS))
  expected, _ = run(ALIASES[name](p=0.25), [jnp.asarray(GRADS[0])], jnp.asarray(PARAMS))
  np.testing.assert_allclose(updates[0], expected[0], rtol=1e-6)


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize(("scheduled", "clipped"), [(0.9, 0.5), (-0.3, 0.0)])
def test_p_schedule_outside_the_range_is_clipped(name, scheduled, clipped):
  tx = ALIASES[name](p=lambda count: jnp.full([], scheduled, jnp.float32))
  updates, _ = run(tx, [jnp.asarray(g) for g in GRADS], jnp.asarray(PARAMS))
  expected, _ = run(ALIASES[name](p=clipped), [jnp.asarray(g) for g in GRADS], jnp.asarray(PARAMS))
  for u, e in zip(updates, expected, strict=True):
    np.testing.assert_allclose(u, e, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_rmsprop_accumulator_back_at_zero_gives_a_zero_update(dtype, decay):
  """eps = 0 and an initial value: with decay 0, or once the initial value has decayed below the
  dtype's range, a zero gradient meets a zero accumulator, and 0/0 must be no step."""
  tx = padam_jax.partial_rmsprop(1e-3, p=0.5, decay=decay, eps=0.0, initial_scale=0.1)
  params = {"a": jnp.zeros(3, dtype)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(200):  # 0.1 * 0.5**200 is 0 in float16 and float32
    updates, state = update(params, state, params)
  np.testing.assert_array_equal(np.asarray(updates["a"], np.float32), np.zeros(3, np.float32))
