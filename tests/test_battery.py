"""The Optax battery: every optimizer of the project through the same checks.

To add optimizers, append ``Case`` entries to ``CASES`` (at the bottom of the
table). ``make`` builds the optimizer with settings that converge on the two
test problems; ``inject`` (optional) is ``(factory, kwargs)`` such that
``optax.inject_hyperparams(factory)(**kwargs)`` must equal ``factory(**kwargs)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import padam_jax


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  make: Callable[[], optax.GradientTransformation]
  inject: tuple[Callable[..., optax.GradientTransformation], dict[str, Any]] | None = None
  supports_mu_dtype: Callable[[Any], optax.GradientTransformation] | None = None
  steps: int = 1000


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

# The registry's optimizers join the battery through examples/optimizers.py.


def _with_standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """Traces ``tx`` with standard dtype promotion.

  Optax's own adam, adamw and yogi compute ``1 - b ** count`` from a Python float
  and the int32 count, which strict promotion rejects; the battery checks this
  project's code, so those internals run with JAX's default promotion.
  """

  def init_fn(params):
    with jax.numpy_dtype_promotion("standard"):
      return tx.init(params)

  def update_fn(updates, state, params=None):
    with jax.numpy_dtype_promotion("standard"):
      return tx.update(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)


def _registry_case(
    name: str, learning_rate: float, steps: int = 1000, **overrides: Any
) -> Case:
  """The registry's CIFAR-10 configuration of ``name``, at a rate that suits the problems.

  The step decays fall at 10x and 15x ``steps``, after the longest run here.
  """
  from examples import optimizers  # the registry lives outside the package

  def make():
    tx = optimizers.make_optimizer(
        name, "cifar10", steps_per_epoch=steps, epochs=20, batch_size=128,
        train_size=50_000, learning_rate=learning_rate, **overrides,
    ).tx
    return _with_standard_promotion(tx) if name in ("adam", "adamw", "yogi") else tx

  return Case(f"registry-{name}", make, steps=steps)


CASES += [
    _registry_case("sgdm", 1e-3),
    _registry_case("adam", 0.01),
    _registry_case("amsgrad", 0.03),
    _registry_case("adamw", 0.1),
    _registry_case("yogi", 0.03),
    # final_lr 1e-3: the paper's 0.1 is an SGD step that Rosenbrock's curvature rejects.
    _registry_case("adabound", 0.03, final_lr=1e-3),
    _registry_case("amsbound", 0.03, final_lr=1e-3),
    _registry_case("padam", 0.03),
    _registry_case("partial_adam", 0.03),
    _registry_case("padamw", 0.03),
    _registry_case("partial_rmsprop", 3e-3),
    _registry_case("partial_adagrad", 6e-3, steps=2000),
    _registry_case("partial_adamax", 0.03),
    _registry_case("partial_adadelta", 2e-3, steps=2000),
]

# The library's new factories directly: inject_hyperparams and mu_dtype.
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


def ids(cases):
  return [c.name for c in cases]


def parabola(params):
  target = jnp.array([1.0, -2.0, 3.0])
  return jnp.sum((params["x"] - target) ** 2)


def rosenbrock(params):
  x, y = params["xy"][0], params["xy"][1]
  return (1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2


def minimise(tx, loss, params, steps):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def body(_, carry):
    return step(*carry)

  params, state = jax.lax.fori_loop(0, steps, body, (params, state))
  return params


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_converges_on_a_parabola(case):
  params = minimise(case.make(), parabola, {"x": jnp.zeros(3)}, case.steps)
  assert float(parabola(params)) < 1e-3


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_converges_on_rosenbrock(case):
  params = minimise(case.make(), rosenbrock, {"xy": jnp.array([0.0, 0.0])}, 5 * case.steps)
  # From (0, 0), a rate that simply stalls in the curved valley leaves a loss near 1.
  assert float(rosenbrock(params)) < 1e-2


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_no_recompilation_on_the_second_call(case):
  chex.clear_trace_counter()
  tx = case.make()
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def update(grads, state, params):
    return tx.update(grads, state, params)

  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)


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
  k = 3
  tx = case.make()
  multi = optax.MultiSteps(case.make(), every_k_schedule=k)
  params = {"w": jnp.array([0.5, -1.5, 2.0])}
  s, ms = tx.init(params), multi.init(params)
  grads = [{"w": jnp.array([0.1, -0.2, 0.3]) * (i + 1)} for i in range(k)]
  for g in grads[:-1]:
    u, ms = multi.update(g, ms, params)
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
  u_multi, ms = multi.update(grads[-1], ms, params)
  mean = jax.tree.map(lambda *g: sum(g) / k, *grads)
  u_plain, _ = tx.update(mean, s, params)
  chex.assert_trees_all_close(u_multi, u_plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_apply_if_finite_skips_a_nan_gradient(case):
  tx = optax.apply_if_finite(case.make(), max_consecutive_errors=3)
  params = {"w": jnp.array([0.5, -1.5, 2.0])}
  state = tx.init(params)
  u, state = tx.update({"w": jnp.array([0.1, 0.2, 0.3])}, state, params)
  params = optax.apply_updates(params, u)
  before_params, before_state = params, state.inner_state
  u, state = tx.update({"w": jnp.array([jnp.nan, 0.2, 0.3])}, state, params)
  after = optax.apply_updates(params, u)
  chex.assert_trees_all_equal(after, before_params)
  chex.assert_trees_all_equal(state.inner_state, before_state)
  assert int(state.notfinite_count) == 1


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
  tx = case.make()
  params = {"w": jnp.array([0.5, -1.5, 2.0], jnp.bfloat16)}
  state = tx.init(params)
  for _ in range(3):
    grads = {"w": jnp.array([0.1, -0.2, 0.3], jnp.bfloat16)}
    updates, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert updates["w"].dtype == jnp.bfloat16
  assert params["w"].dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(params["w"], np.float32)))


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_multi_transform_leaves_frozen_parts_alone(case):
  params = {"trained": jnp.array([0.5, -1.5]), "frozen": jnp.array([3.0, 4.0])}
  labels = {"trained": "train", "frozen": "freeze"}
  tx = optax.multi_transform({"train": case.make(), "freeze": optax.set_to_zero()}, labels)
  alone = case.make()
  state, alone_state = tx.init(params), alone.init(params["trained"])
  for t in range(5):
    grads = {"trained": jnp.array([0.1, 0.2]) * (t + 1), "frozen": jnp.array([1.0, 1.0])}
    updates, state = tx.update(grads, state, params)
    expected, alone_state = alone.update(grads["trained"], alone_state, params["trained"])
    chex.assert_trees_all_close(updates["trained"], expected, rtol=1e-6)
    params = optax.apply_updates(params, updates)
  chex.assert_trees_all_equal(params["frozen"], jnp.array([3.0, 4.0]))


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_sharded_update_keeps_sharding_and_equals_single_device(case):
  devices = jax.devices()
  assert len(devices) == 8, "tests/conftest.py forces 8 host CPU devices"
  mesh = jax.make_mesh((4, 2), ("data", "model"), devices=devices)
  spec = {
      "w": jax.sharding.PartitionSpec("data", "model"),
      "b": jax.sharding.PartitionSpec("model"),
      "s": jax.sharding.PartitionSpec(),
  }
  shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), spec)
  params = {
      "w": jnp.linspace(-1.0, 1.0, 32).reshape(8, 4),
      "b": jnp.arange(4.0),
      "s": jnp.array(0.5),
  }
  grads = jax.tree.map(lambda x: jnp.cos(3.0 * x) + 0.1, params)
  tx = case.make()

  def run(params, grads):
    state = tx.init(params)
    for _ in range(3):
      updates, state = jax.jit(tx.update)(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params, updates

  single_params, _ = run(params, grads)
  sharded_params, sharded_updates = run(
      jax.device_put(params, shardings), jax.device_put(grads, shardings)
  )
  for name in params:
    assert sharded_updates[name].sharding.is_equivalent_to(shardings[name], params[name].ndim)
    assert sharded_params[name].sharding.is_equivalent_to(shardings[name], params[name].ndim)
  chex.assert_trees_all_close(sharded_params, single_params, rtol=1e-6, atol=1e-7)


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
