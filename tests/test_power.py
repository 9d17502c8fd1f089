"""Tests of ``inverse_power``: each form chosen while tracing against float64 NumPy."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import padam_jax
from padam_jax import _power

F32_EPS = float(np.finfo(np.float32).eps)  # 2**-23, one ulp at 1

# p = q / 2 over [0, 1/2]: square-root chains of every depth up to the limit,
# one just past it, and fractions that are not k / 2**n (the paper's grid).
DYADIC_P = [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 3 / 8, 3 / 16, 5 / 16, 7 / 16, 5 / 32, 15 / 32]
OTHER_P = [1 / 128, 0.01, 0.1, 0.2, 1 / 5 + 1e-7, 1 / 3, 0.4, 0.45, 0.499]


def magnitudes() -> np.ndarray:
  """float32 values spanning 1e-30..1e4, zeros, powers of two and mantissa edges."""
  decades = np.logspace(-30, 4, 20_001)
  powers_of_two = np.ldexp(1.0, np.arange(-99, 14))
  # Mantissa edges: just below and at powers of two, and at sqrt(1/2) and sqrt(2).
  edges = np.concatenate(
    [
      np.sqrt(0.5) * powers_of_two,
      2 * np.sqrt(0.5) * powers_of_two,
      np.nextafter(powers_of_two.astype(np.float32), np.float32(0)),
    ]
  )
  x = np.concatenate([[0.0, 0.0], decades, powers_of_two, edges]).astype(np.float32)
  return x[(x == 0) | ((x >= 1e-30) & (x <= 1e4))]


def reference(x: np.ndarray, q: float) -> np.ndarray:
  """``x ** -q`` in float64 from the formula, ``0 ** -q = inf``, ``x ** -0 = 1``."""
  x64 = x.astype(np.float64)
  if q == 0:
    return np.ones_like(x64)
  with np.errstate(divide="ignore"):
    return np.where(x64 == 0, np.inf, x64**-q)


def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
  actual = np.asarray(actual, np.float64)
  assert not np.isnan(actual).any()
  np.testing.assert_array_equal(np.isinf(actual), np.isinf(expected))
  finite = np.isfinite(expected)
  return float(np.max(np.abs(actual[finite] - expected[finite]) / expected[finite]))


def primitives(fn, *args) -> set[str]:
  """Names of every primitive ``fn`` traces to, nested jaxprs included."""
  names = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      for value in eqn.params.values():
        for sub in value if isinstance(value, tuple | list) else [value]:
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            visit(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return names


@pytest.mark.parametrize("p", DYADIC_P)
def test_sqrt_chain_matches_formula(p):
  q = 2 * p
  x = magnitudes()
  fn = jax.jit(lambda x: _power.inverse_power(x, q))
  used = primitives(fn, x)
  assert "div" in used and ("sqrt" in used or q == 1) and not {"pow", "exp", "log"} & used
  # One rounding per square root, product and division, each halved by later roots.
  assert max_relative_error(fn(x), reference(x, q)) <= 4 * F32_EPS


@pytest.mark.parametrize("p", OTHER_P)
def test_reduced_exp_log_matches_formula(p):
  q = 2 * p
  x = magnitudes()
  fn = jax.jit(lambda x: _power.inverse_power(x, q))
  used = primitives(fn, x)
  assert "round" in used and not {"pow", "exp", "log", "sqrt"} & used
  assert max_relative_error(fn(x), reference(x, q)) <= 4 * F32_EPS


@pytest.mark.parametrize("p", DYADIC_P + OTHER_P + [0.0])
def test_traced_exponent_takes_general_path(p):
  q = 2 * p
  x = magnitudes()
  fn = jax.jit(_power.inverse_power)
  used = primitives(fn, x, jnp.float32(q))
  assert "round" in used and not {"pow", "exp", "log", "sqrt"} & used
  # The traced exponent is the float32 number nearest q.
  expected = reference(x, float(np.float32(q)))
  assert max_relative_error(fn(x, jnp.float32(q)), expected) <= 4 * F32_EPS


@pytest.mark.parametrize("q", [1.5, jnp.float32(0.25)])
def test_power_fallback(q):
  """Exponents outside [0, 1] and dtypes without a fast form use jnp.power."""
  x = magnitudes()
  x = x[(x == 0) | (x > 1e-20)]
  if isinstance(q, float):
    fn = jax.jit(lambda x: _power.inverse_power(x, q))
    assert "pow" in primitives(fn, x)
    assert max_relative_error(fn(x), reference(x, q)) <= 64 * F32_EPS
  else:  # integer arrays are promoted by jnp.power, not by the float forms
    y = _power.inverse_power(jnp.arange(1, 5, dtype=jnp.int32).astype(jnp.float32), q)
    np.testing.assert_allclose(y, np.arange(1, 5) ** -0.25, rtol=4 * F32_EPS)


def test_zero_exponent_is_one_everywhere():
  x = jnp.array([0.0, 1e-30, 1.0, 1e4, np.inf], jnp.float32)
  for q in (0, 0.0):
    y = jax.jit(lambda x, q=q: _power.inverse_power(x, q))(x)
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(y, np.ones(5, np.float32))


@pytest.mark.parametrize("q", [0.25, 0.4, 1.0])
def test_infinity_maps_to_zero(q):
  y = _power.inverse_power(jnp.array([np.inf], jnp.float32), q)
  np.testing.assert_array_equal(y, [0.0])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("q", [0.25, 0.4])
def test_half_precision_keeps_dtype_and_accuracy(dtype, q):
  x = magnitudes()
  x = x[(x == 0) | ((x > 1e-4) & (x < 1e4))].astype(dtype)
  y = _power.inverse_power(jnp.asarray(x), q)
  assert y.dtype == dtype
  # Rounding the input and the output to the narrow type: about one ulp each.
  eps = float(jnp.finfo(dtype).eps)
  assert (
    max_relative_error(np.asarray(y, np.float32), reference(np.asarray(x, np.float32), q))
    <= 2 * eps
  )


def test_static_exponent_and_dyadic_bits():
  assert _power.static_exponent(0.25) == 0.25
  assert _power.static_exponent(np.float32(0.25)) == 0.25
  assert _power.static_exponent(1) == 1.0
  assert _power.static_exponent(True) is None
  assert _power.static_exponent(jnp.float32(0.25)) is None  # arrays take the general path
  assert _power.dyadic_bits(0.25) == (2,)
  assert _power.dyadic_bits(0.625) == (1, 3)
  assert _power.dyadic_bits(1 / 2**_power.MAX_SQRT_DEPTH) == (_power.MAX_SQRT_DEPTH,)
  assert _power.dyadic_bits(1 / 2 ** (_power.MAX_SQRT_DEPTH + 1)) is None
  assert _power.dyadic_bits(0.0) is None and _power.dyadic_bits(1.5) is None


@pytest.mark.parametrize("p", [0.0, 1 / 8, 3 / 8, 0.2, 1 / 2])
@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_static_p_equals_injected_p(p, weight_decay):
  """A Python-number p (fast path) and the same p traced by inject_hyperparams agree."""
  rng = np.random.default_rng(0)
  params = {
    "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(3,)) * 1e-3, jnp.float32),
  }
  static = padam_jax.padam(learning_rate=0.1, p=p, weight_decay=weight_decay)
  # Only p is injected: injected b1, b2 would be float32 numbers, not the same rule.
  injected = optax.inject_hyperparams(
    padam_jax.padam, static_args=("learning_rate", "b1", "b2", "eps", "weight_decay")
  )(learning_rate=0.1, p=p, weight_decay=weight_decay)
  static_update = jax.jit(static.update)
  injected_update = jax.jit(injected.update)
  # The injected p is traced (the general path); the static one is not.
  static_ops = primitives(static_update, params, static.init(params), params)
  injected_ops = primitives(injected_update, params, injected.init(params), params)
  # The range reduction of the exp/log form rounds; the square-root chain does not.
  assert "round" in injected_ops and ("round" in static_ops) == (
    p not in (0.0, 1 / 8, 3 / 8, 1 / 2)
  )
  static_state, injected_state = static.init(params), injected.init(params)
  for step in range(6):
    # Gradients over many decades, exact zeros included.
    grads = jax.tree.map(
      lambda x, step=step: jnp.asarray(
        rng.normal(size=x.shape)
        * 10.0 ** rng.uniform(-12, 2, size=x.shape)
        * (rng.uniform(size=x.shape) > 0.2 * (step % 2)),
        jnp.float32,
      ),
      params,
    )
    a, static_state = static_update(grads, static_state, params)
    b, injected_state = injected_update(grads, injected_state, params)
    for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      assert np.isfinite(leaf_a).all()
      # Both paths agree with float64 to a few ulp; the traced p is rounded to
      # float32, which moves denominators of 1e-8 by about 2p * 18 * 2**-24.
      np.testing.assert_allclose(leaf_a, leaf_b, rtol=16 * F32_EPS, atol=0)
    params = optax.apply_updates(params, a)


def test_injected_with_static_p_is_the_fixed_step():
  """inject_hyperparams(static_args=("p", ...)) keeps p a number: the fixed-p step, exactly."""
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
  fixed = padam_jax.padam(learning_rate=0.1, p=1 / 8, weight_decay=5e-4)
  # The learning rate stays injected (it can be read and changed); p, b1, b2, eps stay numbers.
  injected = optax.inject_hyperparams(padam_jax.padam, static_args=("p", "b1", "b2", "eps"))(
    learning_rate=0.1, p=1 / 8, weight_decay=5e-4
  )
  fixed_update, injected_update = jax.jit(fixed.update), jax.jit(injected.update)
  fixed_state, injected_state = fixed.init(params), injected.init(params)
  assert "learning_rate" in injected_state.hyperparams and "p" not in injected_state.hyperparams
  # No exp/log form in the step: the square roots of the fixed number.
  ops = primitives(injected_update, params, injected_state, params)
  assert "round" not in ops and "exp" not in ops and "log" not in ops
  for _ in range(4):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    a, fixed_state = fixed_update(grads, fixed_state, params)
    b, injected_state = injected_update(grads, injected_state, params)
    np.testing.assert_array_equal(a["w"], b["w"])
    params = optax.apply_updates(params, a)


@pytest.mark.parametrize("q", [0.25, 0.4, "traced"])
def test_nan_and_negative_inputs_give_nan(q):
  x = jnp.array([np.nan, -1.0, -1e-20], jnp.float32)
  y = _power.inverse_power(x, jnp.float32(0.4)) if q == "traced" else _power.inverse_power(x, q)
  assert np.isnan(y).all()
