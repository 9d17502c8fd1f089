"""The Optax battery: every optimizer of the library through the same checks.

To add optimizers, append ``Case`` entries to ``CASES`` (at the bottom of the
table). ``make`` builds the optimizer with settings that converge on the two
test problems; ``inject`` (optional) is ``(factory, kwargs)`` such that
``optax.inject_hyperparams(factory)(**kwargs)`` must equal ``factory(**kwargs)``.
The checks themselves are in ``tests/battery.py``; the trainers' optimizer
registry goes through them in ``tests/test_registry_battery.py``.
"""

from __future__ import annotations

import battery
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from battery import Case, ids

import padam_jax

CASES: list[Case] = [
  Case(
    "padam",
    lambda: padam_jax.padam(learning_rate=0.05, p=0.125),
    inject=(padam_jax.padam, dict(learning_rate=0.05, p=0.125, weight_decay=1e-3)),
    supports_mu_dtype=lambda dtype: padam_jax.padam(0.05, p=0.125, mu_dtype=dtype),
  ),
  Case(
    "padam-p-traced",
    lambda: padam_jax.padam(learning_rate=0.05, p=lambda count: jnp.asarray(0.125)),
  ),
  Case(
    "padam-p0.4-wd",
    lambda: padam_jax.padam(learning_rate=0.02, p=0.4, weight_decay=1e-4),
    inject=(padam_jax.padam, dict(learning_rate=0.02, p=0.4, b2=0.99)),
  ),
  Case(
    "padam-algorithm-1",
    lambda: padam_jax.padam(learning_rate=0.01, p=0.25, eps=0.0, bias_correction=False),
  ),
  Case(
    "scale_by_partial_amsgrad",
    lambda: optax.chain(
      padam_jax.scale_by_partial_amsgrad(p=0.125), optax.scale_by_learning_rate(0.05)
    ),
  ),
]

# The library's other factories: inject_hyperparams and mu_dtype.
CASES += [
  Case(
    "adabound",
    lambda: padam_jax.adabound(0.03, final_lr=1e-3),
    inject=(padam_jax.adabound, dict(learning_rate=0.03, final_lr=1e-3, weight_decay=1e-3)),
    supports_mu_dtype=lambda dtype: padam_jax.adabound(0.03, final_lr=1e-3, mu_dtype=dtype),
  ),
  Case(
    "amsbound",
    lambda: padam_jax.amsbound(0.03, final_lr=1e-3),
    inject=(padam_jax.amsbound, dict(learning_rate=0.03, final_lr=1e-3, gamma=1e-2)),
    supports_mu_dtype=lambda dtype: padam_jax.amsbound(0.03, final_lr=1e-3, mu_dtype=dtype),
  ),
  Case(
    "partial_adam",
    lambda: padam_jax.partial_adam(0.03, p=0.125),
    inject=(padam_jax.partial_adam, dict(learning_rate=0.03, p=0.125, weight_decay=1e-3)),
    supports_mu_dtype=lambda dtype: padam_jax.partial_adam(0.03, mu_dtype=dtype),
  ),
  Case(
    "padamw",
    lambda: padam_jax.padamw(0.03, p=0.125, weight_decay=1e-2),
    inject=(padam_jax.padamw, dict(learning_rate=0.03, p=0.25, weight_decay=1e-2)),
    supports_mu_dtype=lambda dtype: padam_jax.padamw(0.03, mu_dtype=dtype),
  ),
  Case(
    "partial_rmsprop",
    lambda: padam_jax.partial_rmsprop(3e-3, p=0.125, momentum=0.9),
    inject=(padam_jax.partial_rmsprop, dict(learning_rate=3e-3, p=0.25, momentum=0.9)),
  ),
  Case(
    "partial_adagrad",
    lambda: padam_jax.partial_adagrad(6e-3, p=0.125),
    inject=(padam_jax.partial_adagrad, dict(learning_rate=6e-3, p=0.25, eps=1e-8)),
    steps=2000,
  ),
  Case(
    "partial_adamax",
    lambda: padam_jax.partial_adamax(0.03, p=0.125),
    inject=(padam_jax.partial_adamax, dict(learning_rate=0.03, p=0.125, b2=0.99)),
    supports_mu_dtype=lambda dtype: padam_jax.partial_adamax(0.03, mu_dtype=dtype),
  ),
  Case(
    "partial_adadelta",
    lambda: padam_jax.partial_adadelta(2e-3, p=0.125),
    inject=(padam_jax.partial_adadelta, dict(learning_rate=2e-3, p=0.25, rho=0.95)),
    steps=2000,
  ),
  Case(
    "padam-annealed-p",
    lambda: padam_jax.padam(0.03, p=padam_jax.anneal_p(500)),
  ),
]


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_converges_on_a_parabola(case):
  battery.check_converges_on_a_parabola(case)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_converges_on_rosenbrock(case):
  battery.check_converges_on_rosenbrock(case)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_no_recompilation_on_the_second_call(case):
  battery.check_no_recompilation_on_the_second_call(case)


INJECT = [c for c in CASES if c.inject]


@pytest.mark.parametrize("case", INJECT, ids=ids(INJECT))
def test_inject_hyperparams_equals_the_plain_optimizer(case):
  factory, kwargs = case.inject
  plain = factory(**kwargs)
  injected = optax.inject_hyperparams(factory)(**kwargs)
  params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
  s1, s2 = plain.init(params), injected.init(params)
  for t in range(20):
    grads = {"w": jnp.sin(params["w"] * (t + 1)) + 0.1}
    u1, s1 = jax.jit(plain.update)(grads, s1, params)
    u2, s2 = jax.jit(injected.update)(grads, s2, params)
    chex.assert_trees_all_close(u1, u2, rtol=1e-5, atol=1e-7)
    params = optax.apply_updates(params, u1)


@pytest.mark.standard_promotion  # optax.MultiSteps mixes int32 and float32 internally
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_multi_steps_applies_the_mean_of_k_gradients(case):
  battery.check_multi_steps_applies_the_mean_of_k_gradients(case)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_apply_if_finite_skips_a_nan_gradient(case):
  battery.check_apply_if_finite_skips_a_nan_gradient(case)


MU_DTYPE = [c for c in CASES if c.supports_mu_dtype]


@pytest.mark.parametrize("case", MU_DTYPE, ids=ids(MU_DTYPE))
def test_mu_dtype_is_stored_and_tracks_the_float32_run(case):
  params = {"w": jnp.array([0.5, -1.5, 2.0])}
  low, full = case.supports_mu_dtype(jnp.bfloat16), case.supports_mu_dtype(None)
  s_low, s_full = low.init(params), full.init(params)
  for t in range(10):
    grads = {"w": jnp.array([0.1, -0.2, 0.3]) * (t + 1)}
    u_low, s_low = low.update(grads, s_low, params)
    u_full, s_full = full.update(grads, s_full, params)
  mus = [x for x in jax.tree.leaves(s_low) if x.shape == (3,) and x.dtype == jnp.bfloat16]
  assert mus, "the first moment is not stored in bfloat16"
  chex.assert_trees_all_close(u_low, u_full, rtol=2e-2)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_bfloat16_params_keep_bfloat16(case):
  battery.check_bfloat16_params_keep_bfloat16(case)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_multi_transform_leaves_frozen_parts_alone(case):
  battery.check_multi_transform_leaves_frozen_parts_alone(case)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_sharded_update_keeps_sharding_and_equals_single_device(case):
  battery.check_sharded_update_keeps_sharding_and_equals_single_device(case)


@pytest.mark.standard_promotion  # optax.piecewise_constant_schedule mixes int32 and float
def test_p_and_learning_rate_schedules_are_evaluated_at_the_update_count():
  seen = []

  def p_schedule(count):
    jax.debug.callback(lambda c: seen.append(int(c)), count)
    return jnp.asarray(0.125)

  lr = optax.piecewise_constant_schedule(0.1, {2: 0.5})
  tx = padam_jax.padam(learning_rate=lr, p=p_schedule)
  fixed = padam_jax.padam(learning_rate=0.1, p=0.125)
  params = jnp.array([1.0, -1.0])
  state, fixed_state = tx.init(params), fixed.init(params)
  for t in range(4):
    u, state = tx.update(params, state, params)
    uf, fixed_state = fixed.update(params, fixed_state, params)
    factor = 1.0 if t < 2 else 0.5
    np.testing.assert_allclose(u, factor * uf, rtol=1e-6)
  jax.effects_barrier()
  assert seen == [0, 1, 2, 3]
