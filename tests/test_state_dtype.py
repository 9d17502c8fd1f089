"""Moments kept narrower than float32 (``mu_dtype``, ``nu_dtype``): stochastic rounding, unbiased
and the same on any device layout; every rule with a second moment; ``inject_hyperparams``."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import padam_jax
from padam_jax import _rounding

BF16 = jnp.bfloat16


@pytest.mark.parametrize(
  ("dtype", "low", "high"),
  [(BF16, 1.0, 1 + 2**-7), (jnp.float16, 1.0, 1 + 2**-10)],
  ids=["bfloat16", "float16"],
)
def test_stochastic_rounding_is_unbiased_between_two_neighbours(dtype, low, high):
  n = 2**16
  value = np.float32(low + (high - low) / 8)  # the upper neighbour with probability 1/8
  rounded = _rounding.store(jnp.full((n,), value), dtype, 7, 3).astype(jnp.float32)
  rounded = np.asarray(rounded, np.float64)
  assert set(np.unique(rounded)) == {low, high}
  up = np.mean(rounded == high)
  assert abs(up - 1 / 8) < 4 * np.sqrt(1 / 8 * 7 / 8 / n), up
  # The same arguments give the same bits; another step count other ones.
  again = np.asarray(_rounding.store(jnp.full((n,), value), dtype, 7, 3).astype(jnp.float32))
  np.testing.assert_array_equal(again, rounded)
  other = np.asarray(_rounding.store(jnp.full((n,), value), dtype, 8, 3).astype(jnp.float32))
  assert not np.array_equal(other, rounded)
  # Values of the dtype, infinities and NaN are kept.
  exact = jnp.array([low, high, -high, 0.0, np.inf, -np.inf, np.nan], jnp.float32)
  kept = np.asarray(_rounding.store(exact, dtype, 1, 0).astype(jnp.float32))
  np.testing.assert_array_equal(kept, np.asarray(exact))


def test_bfloat16_rounding_matches_a_numpy_reference():
  # Every kind of float32: normal values of any magnitude and sign, subnormals, values near
  # bfloat16's largest, exact bfloat16 values, zeros, infinities.
  rng = np.random.default_rng(0)
  n = 4096
  x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-40, 38, n)).astype(np.float32)
  x[:8] = [0.0, -0.0, np.inf, -np.inf, 1.0, -1.5, 3.3895314e38, -3.39e38]
  x[8:16] = np.float32(1e-45) * np.arange(1, 9)
  bits = rng.integers(0, 2**32, n, dtype=np.uint32)
  got = np.asarray(_rounding.stochastic_round(jnp.asarray(x), BF16, jnp.asarray(bits)))
  # The reference: the neighbours of |x| in bfloat16 (towards and away from zero) from float64
  # arithmetic, and "up" when the uniform variate of the bits' upper 16 bits reaches 1 - p.
  bf = ml_dtypes.bfloat16
  magnitude = np.abs(x.astype(np.float64))
  low = magnitude.astype(np.float32).astype(bf)  # nearest; step down where it rounded up
  low = np.where(low.astype(np.float64) > magnitude, np.nextafter(low, bf(0)), low)
  high = np.where(low.astype(np.float64) == magnitude, low, np.nextafter(low, bf(np.inf)))
  with np.errstate(invalid="ignore"):
    gap = high.astype(np.float64) - low.astype(np.float64)
    # Above the largest finite value the next code is infinity, one binade's gap away.
    gap = np.where(np.isinf(high) & np.isfinite(low), 2.0**128 - low.astype(np.float64), gap)
    p = np.where(np.isfinite(gap) & (gap > 0), (magnitude - low.astype(np.float64)) / gap, 0.0)
  u = (bits >> 16).astype(np.float64) / 2**16
  expected = np.where(u >= 1 - p, high, low).astype(np.float64) * np.sign(x)
  expected = np.where(x == 0, x, expected)  # keep the sign of zero
  np.testing.assert_array_equal(got.astype(np.float64), expected)
  assert np.isnan(np.asarray(_rounding.stochastic_round(jnp.float32(np.nan), BF16, 0)))


def test_random_bits_are_balanced_and_unrelated_between_neighbours():
  words = np.asarray(_rounding.random_bits(jnp.zeros(2**16), 5, 2))
  per_bit = (words[:, None] >> np.arange(32, dtype=np.uint32)) & 1
  tolerance = 5 * np.sqrt(0.25 / words.size)
  assert np.max(np.abs(per_bit.mean(0) - 0.5)) < tolerance
  # Neighbouring indices agree on half of their bits, as unrelated words do.
  agree = 1 - np.mean(per_bit[1:] != per_bit[:-1])
  assert abs(agree - 0.5) < tolerance
  assert len(np.unique(words)) == words.size  # a bijection of the index


def run_constant_gradient(tx, steps=5000, n=16):
  """The last update of ``steps`` updates of ``tx`` with the gradient 1e-2 everywhere."""
  g = jnp.full((n,), 1e-2, jnp.float32)

  def body(state, _):
    return tx.update(g, state)[1], None

  state, _ = jax.lax.scan(body, tx.init(g), None, length=steps - 1)
  return tx.update(g, state)[0]


def nearest_bfloat16_second_moment(steps=5000, b2=0.999, g=1e-2):
  """``v`` rounded to the nearest bfloat16 after every step (``astype``), in NumPy."""
  v = np.float32(0.0)
  for _ in range(steps):
    v = (np.float32(b2) * v + np.float32(1 - b2) * np.float32(g * g)).astype(ml_dtypes.bfloat16)
    v = v.astype(np.float32)
  return float(v)


def test_constant_gradient_bfloat16_second_moment_follows_float32():
  p = 0.125
  full, narrow = jax.jit(
    lambda: [
      run_constant_gradient(padam_jax.scale_by_partial_amsgrad(p=p, nu_dtype=dtype))
      for dtype in (None, BF16)
    ]
  )()
  relative = np.asarray(narrow) / np.asarray(full) - 1
  assert np.max(np.abs(relative)) < 0.015, relative
  # Rounded to nearest, v stops at 3.05e-5 (float32: 9.93e-5): the step is 16% too large.
  v32 = 1 - 0.999**5000  # times g^2 = 1e-4
  v_nearest = nearest_bfloat16_second_moment() / 1e-4
  assert abs((v32 / v_nearest) ** p - 1) > 0.1


def params_and_grads():
  params = {"w": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8), "b": jnp.array([0.5, -0.25])}
  grads = jax.tree.map(lambda x: 1e-3 * (jnp.cos(3.0 * x) + 0.1), params)
  return params, grads


def run(tx, params, grads, steps=3):
  state = tx.init(params)
  for t in range(steps):
    updates, state = tx.update(jax.tree.map(lambda g, k=1 + t: k * g, grads), state, params)
  return updates, state


def test_narrow_state_has_the_same_bits_on_any_device_layout():
  tx = padam_jax.padam(0.1, mu_dtype=BF16, nu_dtype=BF16)
  params, grads = params_and_grads()
  step = jax.jit(functools.partial(run, tx))
  reference = step(params, grads)
  assert {x.dtype for x in jax.tree.leaves(reference[1][1])} >= {jnp.dtype(BF16)}
  assert_same_bits = functools.partial(jax.tree.map, np.testing.assert_array_equal)
  assert_same_bits(step(params, grads), reference)  # the same run twice
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  for spec in (PartitionSpec("fsdp", None), PartitionSpec(None, "fsdp")):
    sharding = {"w": NamedSharding(mesh, spec), "b": NamedSharding(mesh, PartitionSpec())}
    sharded = step(jax.device_put(params, sharding), jax.device_put(grads, sharding))
    assert_same_bits(sharded, reference)
    nu = sharded[1][1].nu["w"]
    assert nu.dtype == BF16 and nu.sharding.is_equivalent_to(sharding["w"], 2)


SECOND_MOMENTS = {
  "padam": lambda **kw: padam_jax.padam(0.1, **kw),
  "padamw": lambda **kw: padam_jax.padamw(0.1, **kw),
  "partial_adam": lambda **kw: padam_jax.partial_adam(0.1, **kw),
  "partial_adamax": lambda **kw: padam_jax.partial_adamax(0.1, **kw),
  "amsbound": lambda **kw: padam_jax.amsbound(0.03, **kw),
  "partial_rmsprop": lambda **kw: padam_jax.partial_rmsprop(0.01, **kw),
  "partial_adagrad": lambda **kw: padam_jax.partial_adagrad(0.1, **kw),
  "partial_adadelta": lambda **kw: padam_jax.partial_adadelta(1.0, **kw),
}


@pytest.mark.parametrize("name", SECOND_MOMENTS)
def test_every_second_moment_is_kept_in_nu_dtype(name):
  make = SECOND_MOMENTS[name]
  params, grads = params_and_grads()
  narrow, full, explicit = jax.jit(
    lambda params, grads: [run(make(nu_dtype=d), params, grads) for d in (BF16, None, jnp.float32)]
  )(params, grads)
  dtypes = {x.dtype for x in jax.tree.leaves(narrow[1]) if x.shape == (8, 8)}
  assert jnp.dtype(BF16) in dtypes
  for u, u32 in zip(jax.tree.leaves(narrow[0]), jax.tree.leaves(full[0]), strict=True):
    assert u.dtype == jnp.float32
    np.testing.assert_allclose(u, u32, rtol=0.03, atol=1e-7)
  # nu_dtype=float32 is the default path, bit for bit.
  jax.tree.map(np.testing.assert_array_equal, explicit, full)


def test_bfloat16_parameters_with_a_bfloat16_state_update_in_float32():
  params = {"w": jnp.array([0.5, -1.5, 2.0], BF16)}
  grads = {"w": jnp.array([1e-3, -2e-3, 3e-3], BF16)}
  as_float32 = functools.partial(jax.tree.map, lambda x: x.astype(jnp.float32))
  (updates, state), (full, _) = jax.jit(
    lambda params, grads: [
      run(padam_jax.padam(0.1, mu_dtype=BF16, nu_dtype=BF16), params, grads),
      run(padam_jax.padam(0.1), as_float32(params), as_float32(grads)),
    ]
  )(params, grads)
  assert updates["w"].dtype == BF16
  assert {x.dtype for x in jax.tree.leaves(state) if x.ndim} == {jnp.dtype(BF16)}
  np.testing.assert_allclose(updates["w"].astype(jnp.float32), full["w"], rtol=0.02)


def test_nu_dtype_inside_inject_hyperparams():
  params, grads = params_and_grads()
  # By name: inject_hyperparams would take the callable jnp.bfloat16 for a schedule.
  injected = optax.inject_hyperparams(padam_jax.padam)(learning_rate=0.1, nu_dtype="bfloat16")
  plain = padam_jax.padam(0.1, nu_dtype=BF16)
  (updates, state), (expected, _) = jax.jit(
    lambda params, grads: [run(tx, params, grads) for tx in (injected, plain)]
  )(params, grads)
  assert state.inner_state[1].nu_max["w"].dtype == BF16
  # Traced hyperparameters take other float32 paths (1 ulp), and a rounding may go the other way.
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-3), updates, expected)


def test_bad_state_dtypes_are_refused():
  with pytest.raises(TypeError, match="nu_dtype must be a floating-point dtype or None"):
    padam_jax.padam(nu_dtype=jnp.int32)
  with pytest.raises(TypeError, match="nu_dtype must be a floating-point dtype"):
    padam_jax.partial_rmsprop(nu_dtype="complex64")
  with pytest.raises(TypeError, match="mu_dtype must be a floating-point or complex dtype"):
    padam_jax.partial_adam(mu_dtype="not a dtype")
