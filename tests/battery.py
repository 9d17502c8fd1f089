"""The Optax battery's cases and checks, shared by the modules that run them.

``tests/test_battery.py`` runs the checks over the library's optimizers and
``tests/test_registry_battery.py`` over the trainers' optimizer registry. A ``Case``'s
``make`` builds the optimizer with settings that converge on the two test
problems; ``inject`` (optional) is ``(factory, kwargs)`` such that
``optax.inject_hyperparams(factory)(**kwargs)`` must equal ``factory(**kwargs)``;
``supports_mu_dtype`` (optional) builds it with a given ``mu_dtype``.
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


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  make: Callable[[], optax.GradientTransformation]
  inject: tuple[Callable[..., optax.GradientTransformation], dict[str, Any]] | None = None
  supports_mu_dtype: Callable[[Any], optax.GradientTransformation] | None = None
  steps: int = 1000


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


# The checks every case goes through. A module runs each as a test parametrised over its cases;
# check_multi_steps_applies_the_mean_of_k_gradients needs the standard_promotion mark
# (optax.MultiSteps mixes int32 and float32 internally).


def check_converges_on_a_parabola(case):
  params = minimise(case.make(), parabola, {"x": jnp.zeros(3)}, case.steps)
  assert float(parabola(params)) < 1e-3


def check_converges_on_rosenbrock(case):
  params = minimise(case.make(), rosenbrock, {"xy": jnp.array([0.0, 0.0])}, 5 * case.steps)
  # From (0, 0), a rate that simply stalls in the curved valley leaves a loss near 1.
  assert float(rosenbrock(params)) < 1e-2


def check_no_recompilation_on_the_second_call(case):
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


def check_multi_steps_applies_the_mean_of_k_gradients(case):
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


def check_apply_if_finite_skips_a_nan_gradient(case):
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


def check_bfloat16_params_keep_bfloat16(case):
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


def check_multi_transform_leaves_frozen_parts_alone(case):
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


def check_sharded_update_keeps_sharding_and_equals_single_device(case):
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
