"""Every optimizer's state follows its parameters' sharding (FSDP-style meshes), as Optax's own.

On the 8 host CPU devices of ``tests/conftest.py``: a ``data`` x ``fsdp`` mesh with a large
parameter sharded over ``fsdp`` and a small one replicated. ``init`` on abstract parameters
gives the state's shapes and dtypes, and each per-parameter state array has its parameter's
sharding after ``init``, after ``update`` and under ``jit``, with the mesh's axes ``Auto`` and
``Explicit``. (``tests/battery.py`` checks that a sharded run equals an unsharded one.)

Every optimizer runs with ``p`` a number (where it has one); ``p`` as a schedule runs for one
rule of each of the three code paths that evaluate it (``_adam_like``, ``_partial_adadelta``
and ``_common.scale_by_partial_accumulator``). Per mesh, one test covers every case: ``init``
and ``update`` op by op, then a single ``jit`` program of every case's ``init`` and one of
every case's ``update`` (compiling is what takes the time, and costs less once than per case).
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
NOT_OPTIMIZERS = {"__version__", "anneal_p", "with_quantized_state"}
OPTIMIZERS = sorted(
  name
  for name in padam_jax.__all__
  if name not in NOT_OPTIMIZERS and not isinstance(getattr(padam_jax, name), type)
)
# A schedule for p is evaluated by the same shared code in every rule of a family
# (padam_jax._common.partial_exponent): one rule of each family that evaluates p runs it.
SCHEDULE_RULES = ("padam", "partial_adadelta", "partial_rmsprop")


def has_p(name: str) -> bool:
  return "p" in inspect.signature(getattr(padam_jax, name)).parameters


CASES = [(name, "number" if has_p(name) else "-") for name in OPTIMIZERS] + [
  (name, "schedule") for name in SCHEDULE_RULES
]
# Every case with p as a schedule (cheap: no update runs in that test).
ABSTRACT_CASES = [
  (name, p_kind)
  for name in OPTIMIZERS
  for p_kind in (("number", "schedule") if has_p(name) else ("-",))
]
# Op by op, update compiles each new operation (slow): it runs for the full optimizers, which
# chain every scale_by_* rule (padam: scale_by_partial_amsgrad, adabound:
# scale_by_adabound, ...); the rules themselves run under jit like every case.
EAGER = {name for name in OPTIMIZERS if not name.startswith("scale_by_")}
EAGER_EXPLICIT = {"padam", "padamw", "adabound"}
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
  # Every optimizer runs with p as a number (or without p), the schedule rules with a schedule.
  assert sorted(name for name, p_kind in CASES if p_kind != "schedule") == OPTIMIZERS
  assert all(has_p(name) for name in SCHEDULE_RULES)
  assert len(EAGER) == 9 and EAGER >= set(SCHEDULE_RULES), EAGER


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


@pytest.mark.parametrize(("name", "p_kind"), ABSTRACT_CASES)
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


def assert_follows(state, shardings: dict, case) -> None:
  for parameter, leaf in per_parameter_leaves(state):
    assert leaf.sharding.is_equivalent_to(shardings[parameter], leaf.ndim), (
      case,
      parameter,
      leaf.sharding,
      shardings[parameter],
    )
  for leaf in jax.tree.leaves(state):
    if leaf.ndim == 0:
      assert leaf.sharding.is_fully_replicated, (case, leaf.sharding)


def test_state_follows_the_parameters_sharding():
  auto = mesh(AxisType.Auto)
  shardings = {k: NamedSharding(auto, spec) for k, spec in SPECS.items()}
  params, grads = params_and_grads(shardings)
  txs = [make(*case) for case in CASES]
  for case, tx in zip(CASES, txs, strict=True):
    state = tx.init(params)
    assert_follows(state, shardings, case)
    if case[0] in EAGER and case[1] != "schedule":
      updates, state = tx.update(grads, state, params)
      assert_follows(state, shardings, case)
      assert_follows(updates, shardings, case)  # the updates are shaped like the parameters

  # With Auto axes, jit(init) leaves the placement of its zeros to XLA (a single device), as
  # for Optax's own optimizers: the state is placed through out_shardings, by parameter.
  def init_all(params):
    return [tx.init(params) for tx in txs]

  def update_all(grads, states, params):
    return [tx.update(grads, state, params) for tx, state in zip(txs, states, strict=True)]

  replicated = NamedSharding(auto, PartitionSpec())
  state_shardings = jax.tree_util.tree_map_with_path(
    lambda path, _: shardings.get(parameter_of(path), replicated), jax.eval_shape(init_all, params)
  )
  states = jax.jit(init_all, out_shardings=state_shardings)(params)
  for case, state in zip(CASES, states, strict=True):
    assert_follows(state, shardings, case)
  update = jax.jit(update_all)
  for _ in range(2):  # the second step takes the first one's state as is
    results = update(grads, states, params)
    states = [state for _, state in results]
    for case, (updates, state) in zip(CASES, results, strict=True):
      assert_follows(state, shardings, case)
      assert_follows(updates, shardings, case)


def same_spec(a: PartitionSpec, b: PartitionSpec, ndim: int) -> bool:
  """Whether two specs shard an array of rank ``ndim`` alike (``P()`` is ``P(None)``)."""
  return (*a, *[None] * (ndim - len(a))) == (*b, *[None] * (ndim - len(b)))


def test_state_follows_the_parameters_sharding_with_explicit_axes():
  explicit = mesh(AxisType.Explicit)
  shardings = {k: NamedSharding(explicit, spec) for k, spec in SPECS.items()}
  txs = [make(*case) for case in CASES]

  def specs_follow(state, case):
    for parameter, leaf in per_parameter_leaves(state):
      spec = jax.typeof(leaf).sharding.spec
      assert same_spec(spec, SPECS[parameter], leaf.ndim), (case, parameter, jax.typeof(leaf))
    assert_follows(state, shardings, case)

  with jax.set_mesh(explicit):
    params, grads = params_and_grads(shardings)
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
    )
    for case, tx in zip(CASES, txs, strict=True):
      for parameter, leaf in per_parameter_leaves(jax.eval_shape(tx.init, abstract)):
        assert same_spec(leaf.sharding.spec, SPECS[parameter], leaf.ndim), (
          case,
          parameter,
          leaf.sharding,
        )
      state = tx.init(params)
      specs_follow(state, case)
      # Op by op for three rules (each new operation compiles); every case updates under jit below.
      if case[0] in EAGER_EXPLICIT and case[1] != "schedule":
        updates, state = tx.update(grads, state, params)
        specs_follow(state, case)
        specs_follow(updates, case)

    states = jax.jit(lambda params: [tx.init(params) for tx in txs])(params)
    for case, state in zip(CASES, states, strict=True):
      specs_follow(state, case)
    results = jax.jit(
      lambda grads, states, params: [
        tx.update(grads, state, params) for tx, state in zip(txs, states, strict=True)
      ]
    )(grads, states, params)
    for case, (updates, state) in zip(CASES, results, strict=True):
      specs_follow(state, case)
      specs_follow(updates, case)
