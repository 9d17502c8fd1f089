"""Every optimizer's state follows its parameters' sharding (FSDP-style meshes), as Optax's own.

On the 8 host CPU devices of ``tests/conftest.py``: a ``data`` x ``fsdp`` mesh with a large
parameter sharded over ``fsdp`` and a small one replicated. ``init`` on abstract parameters
gives the state's shapes and dtypes, and each per-parameter state array has its parameter's
sharding after ``init``, after ``update`` and under ``jit``, with the mesh's axes ``Auto`` and
``Explicit``. (``tests/battery.py`` checks that a sharded run equals an unsharded one.)
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import padam_jax

P_SCHEDULE = padam_jax.anneal_p(4, init_p=0.5, end_p=0.125)
# Every optimizer factory in padam_jax.__all__; the rest are state classes, the version and
# the schedule for p.
NOT_OPTIMIZERS = {"__version__", "anneal_p"}
OPTIMIZERS = sorted(
  name
  for name in padam_jax.__all__
  if name not in NOT_OPTIMIZERS and not isinstance(getattr(padam_jax, name), type)
)
CASES = [
  (name, p_kind)
  for name in OPTIMIZERS
  for p_kind in (
    ("number", "schedule")
    if "p" in inspect.signature(getattr(padam_jax, name)).parameters
    else ("-",)
  )
]
SPECS = {"w": PartitionSpec("fsdp", None), "b": PartitionSpec()}


def make(name: str, p_kind: str) -> optax.GradientTransformation:
  factory = getattr(padam_jax, name)
  arguments = inspect.signature(factory).parameters
  kwargs = {}
  if p_kind != "-":
    kwargs["p"] = 0.2 if p_kind == "number" else P_SCHEDULE
  if "weight_decay" in arguments:
    kwargs["weight_decay"] = 1e-4
  return factory(**kwargs)


def test_every_optimizer_is_covered():
  assert len(OPTIMIZERS) == 16, OPTIMIZERS
  assert {"padam", "padamw", "adabound", "scale_by_partial_amsgrad"} <= set(OPTIMIZERS)


@functools.cache
def mesh(axis_type: AxisType) -> jax.sharding.Mesh:
  assert len(jax.devices()) == 8, "tests/conftest.py forces 8 host CPU devices"
  return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(axis_type,) * 2)


def params_and_grads(sharding: dict | None = None) -> tuple[dict, dict]:
  params = {"w": jnp.linspace(-1.0, 1.0, 32).reshape(8, 4), "b": jnp.array([0.5, -0.25, 2.0])}
  grads = jax.tree.map(lambda x: jnp.cos(3.0 * x) + 0.1, params)
  if sharding is not None:
    params, grads = jax.device_put(params, sharding), jax.device_put(grads, sharding)
  return params, grads


def parameter_of(path) -> str | None:
  """The parameter a state leaf belongs to: the last dict key on its path."""
  keys = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
  return keys[-1] if keys and keys[-1] in SPECS else None


def per_parameter_leaves(state) -> list[tuple[str, jax.Array]]:
  """``(parameter, leaf)`` for every state array shaped like a parameter; checks the rest are
  scalars (step counts, injected hyperparameters)."""
  leaves = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    name = parameter_of(path)
    if name is None:
      assert leaf.shape == (), (jax.tree_util.keystr(path), leaf.shape)
    else:
      leaves.append((name, leaf))
  return leaves


@pytest.mark.parametrize(("name", "p_kind"), CASES)
def test_init_on_abstract_parameters(name, p_kind):
  tx = make(name, p_kind)
  params, _ = params_and_grads()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  shapes = jax.eval_shape(tx.init, abstract)
  concrete = tx.init(params)
  assert jax.tree.structure(shapes) == jax.tree.structure(concrete)
  for shape, leaf in zip(jax.tree.leaves(shapes), jax.tree.leaves(concrete), strict=True):
    assert (shape.shape, shape.dtype) == (leaf.shape, leaf.dtype)
  moments = per_parameter_leaves(shapes)
  assert moments, "no per-parameter state"
  for parameter, leaf in moments:
    assert (leaf.shape, leaf.dtype) == (params[parameter].shape, params[parameter].dtype)


def assert_follows(state, shardings: dict) -> None:
  for parameter, leaf in per_parameter_leaves(state):
    assert leaf.sharding.is_equivalent_to(shardings[parameter], leaf.ndim), (
      parameter,
      leaf.sharding,
      shardings[parameter],
    )
  for leaf in jax.tree.leaves(state):
    if leaf.ndim == 0:
      assert leaf.sharding.is_fully_replicated


@pytest.mark.parametrize(("name", "p_kind"), CASES)
def test_state_follows_the_parameters_sharding(name, p_kind):
  tx = make(name, p_kind)
  shardings = {k: NamedSharding(mesh(AxisType.Auto), spec) for k, spec in SPECS.items()}
  params, grads = params_and_grads(shardings)
  state = tx.init(params)
  assert_follows(state, shardings)
  if p_kind != "schedule":  # op by op, slow: once per optimizer
    updates, state = tx.update(grads, state, params)
    assert_follows(state, shardings)
    assert_follows(updates, shardings)  # the updates are shaped like the parameters

  # With Auto axes, jit(init) leaves the placement of its zeros to XLA (a single device), as
  # for Optax's own optimizers: the state is placed through out_shardings, by parameter.
  replicated = NamedSharding(mesh(AxisType.Auto), PartitionSpec())
  state_shardings = jax.tree_util.tree_map_with_path(
    lambda path, _: shardings.get(parameter_of(path), replicated), jax.eval_shape(tx.init, params)
  )
  jit_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  assert_follows(jit_state, shardings)
  update = jax.jit(tx.update)
  for _ in range(2):
    updates, jit_state = update(grads, jit_state, params)
    assert_follows(jit_state, shardings)
  assert_follows(updates, shardings)


def same_spec(a: PartitionSpec, b: PartitionSpec, ndim: int) -> bool:
  """Whether two specs shard an array of rank ``ndim`` alike (``P()`` is ``P(None)``)."""
  return (*a, *[None] * (ndim - len(a))) == (*b, *[None] * (ndim - len(b)))


@pytest.mark.parametrize(("name", "p_kind"), CASES)
def test_state_follows_the_parameters_sharding_with_explicit_axes(name, p_kind):
  tx = make(name, p_kind)
  explicit = mesh(AxisType.Explicit)
  shardings = {k: NamedSharding(explicit, spec) for k, spec in SPECS.items()}
  with jax.set_mesh(explicit):
    params, grads = params_and_grads(shardings)
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
    )
    for parameter, leaf in per_parameter_leaves(jax.eval_shape(tx.init, abstract)):
      assert same_spec(leaf.sharding.spec, SPECS[parameter], leaf.ndim), (parameter, leaf.sharding)

    def specs_follow(state):
      for parameter, leaf in per_parameter_leaves(state):
        spec = jax.typeof(leaf).sharding.spec
        assert same_spec(spec, SPECS[parameter], leaf.ndim), (parameter, jax.typeof(leaf))
      assert_follows(state, shardings)

    state = tx.init(params)
    specs_follow(state)
    if p_kind != "schedule":  # op by op, slow: once per optimizer
      updates, state = tx.update(grads, state, params)
      specs_follow(state)
      specs_follow(updates)
    updates, state = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    specs_follow(state)
    specs_follow(updates)
