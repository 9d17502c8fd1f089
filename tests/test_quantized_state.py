"""``with_quantized_state``: the codes against a NumPy reference, unbiased rounding, around
``optax.adam`` and Padam, inside ``optax.inject_hyperparams``, under ``jit``, sharded, and held by
a Flax NNX ``nnx.Optimizer``."""

import functools
import math

import jax
import jax.extend
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import padam_jax
from padam_jax import _quantized, _rounding

# --- An independent NumPy reference of one block's code ------------------------------------------


def e5m3_values() -> np.ndarray:
  """The unsigned code's 256 values: ``c < 8`` subnormal ``c * 2**-33``, else
  ``2**((c >> 3) - 31) * (1 + (c & 7) / 8)``."""
  c = np.arange(256)
  normal = 2.0 ** ((c >> 3) - 31) * (1 + (c & 7) / 8)
  return np.where(c < 8, c * 2.0**-33, normal)


def e4m3_values() -> np.ndarray:
  return np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)


def reference_encode(block: np.ndarray) -> tuple[np.ndarray, int]:
  """Codes (rounded to nearest) and header of one block: scale ``2**E``, the least ``E`` with the
  largest magnitude at most the code's largest value (1.875 unsigned, 448 signed)."""
  unsigned = bool(np.all(block >= 0))
  top = 1.875 if unsigned else 448.0
  exponent = math.ceil(math.log2(np.max(np.abs(block)) / top))
  y = block.astype(np.float64) / 2.0**exponent
  if unsigned:
    codes = np.argmin(np.abs(y[:, None] - e5m3_values()[None, :]), axis=1).astype(np.uint8)
  else:
    codes = y.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
  return codes, 2 * exponent + unsigned


def test_every_code_decodes_to_its_reference_value():
  codes = jnp.arange(256, dtype=jnp.uint8).reshape(1, 256)
  for header, values in ((1, e5m3_values()), (6, 8 * e4m3_values())):  # 2^0 unsigned, 2^3 signed
    decoded = np.asarray(_quantized.decode(codes, jnp.array([[header]], jnp.int8)), np.float64)
    finite = np.isfinite(values)
    np.testing.assert_array_equal(decoded[0, finite], values[finite])
    assert np.all(np.isnan(decoded[0, ~finite]))


def test_blocks_encode_as_the_numpy_reference():
  rng = np.random.default_rng(0)
  magnitudes = np.exp(rng.uniform(-12.0, 3.0, (6, 32)))
  signs = np.where(rng.random((6, 32)) < 0.5, -1.0, 1.0)
  x = np.concatenate([magnitudes[:3], signs[3:] * magnitudes[3:]]).astype(np.float32)
  x[1, :16] *= 1e-9  # a block far below the others
  nearest = jnp.full(x.shape, 2**31, jnp.uint32)  # rounds to nearest
  codes, header = jax.jit(_quantized.encode, static_argnums=1)(jnp.asarray(x), 16, nearest)
  for row in range(6):
    for block in range(2):
      part = x[row, 16 * block : 16 * (block + 1)]
      want_codes, want_header = reference_encode(part)
      np.testing.assert_array_equal(
        np.asarray(codes[row, 16 * block : 16 * (block + 1)]), want_codes
      )
      assert int(header[row, block]) == want_header
  # Round trip: within half a step of 3 mantissa bits, relative (2**-4), above the subnormals.
  decoded = np.asarray(_quantized.decode(codes, header))
  big = np.abs(x) > 2.0**-13 * np.abs(x).reshape(6, 2, 16).max(-1).repeat(16, axis=1)
  assert np.all(np.abs(decoded - x)[big] <= 2.0**-4 * np.abs(x)[big])


def test_stochastic_quantization_is_unbiased():
  # Each row is its own draw of the same block: values between codes, a signed and an unsigned one.
  rows = 4096
  signed = np.array([1.3, -0.7, 0.011, 5.0e-3, -3.3, 2.2, 0.9, -5.3], np.float32)
  x = np.tile(np.concatenate([signed, np.abs(signed)]), (rows, 1))
  roundtrip = jax.jit(
    lambda x: _quantized.decode(*_quantized.encode(x, 8, _rounding.random_bits(x, 5, 0)))
  )
  decoded = np.asarray(roundtrip(jnp.asarray(x)), np.float64)
  spread = decoded.std(0) / np.sqrt(rows)
  assert np.all(np.abs(decoded.mean(0) - x[0]) < 4 * spread + 1e-12), (decoded.mean(0), x[0])
  assert np.all(decoded.std(0)[np.abs(x[0]) > 0] > 0)  # rounded both ways


# --- The wrapper ------------------------------------------------------------------------------


def params_and_grads(n=64):
  params = {"w": jnp.linspace(-1.0, 1.0, 8 * n).reshape(8, n), "b": jnp.linspace(0.0, 1.0, 16)}
  grads = jax.tree.map(lambda x: 1e-2 * (jnp.cos(5.0 * x) + 0.2 * x), params)
  return params, grads


def run(tx, params, grads, steps=5):
  """The last updates and the state after ``steps`` updates with the gradients ``t * grads``."""

  def step(state, t):
    updates, state = tx.update(jax.tree.map(lambda g: t * g, grads), state, params)
    return state, updates

  state, updates = jax.lax.scan(step, tx.init(params), jnp.arange(1.0, steps + 1))
  return jax.tree.map(lambda u: u[-1], updates), state


def quantized(state) -> list[padam_jax.QuantizedArray]:
  """The quantized leaves of the :class:`padam_jax.QuantizedState` in ``state``."""
  is_state = lambda x: isinstance(x, padam_jax.QuantizedState)  # noqa: E731
  (found,) = [x for x in jax.tree.leaves(state, is_leaf=is_state) if is_state(x)]
  return found.quantized_arrays()


@pytest.mark.standard_promotion  # optax.adam's bias correction raises a float to an int32 power
def test_wraps_optax_adam_and_padam_and_follows_their_float32_updates():
  params, grads = params_and_grads()
  for make, count in ((lambda: optax.adam(1e-2), 2), (lambda: padam_jax.padam(0.1), 3)):
    small = padam_jax.with_quantized_state(make(), block_size=16, min_size=256)
    (updates, state), (full, _) = jax.jit(
      lambda params, grads, small=small, make=make: [
        run(small, params, grads),
        run(make(), params, grads),
      ]
    )(params, grads)
    assert isinstance(state, padam_jax.QuantizedState) and int(state.count) == 5
    arrays = quantized(state)
    assert len(arrays) == count  # the moments of w; b's (16 elements) stay float32
    for x in arrays:
      assert (x.codes.dtype, x.codes.shape, x.header.dtype, x.header.shape) == (
        jnp.uint8,
        (8, 64),
        jnp.int8,
        (8, 4),
      )
    np.testing.assert_allclose(updates["b"], full["b"], rtol=1e-6)  # not quantized
    error = np.linalg.norm(updates["w"] - full["w"]) / np.linalg.norm(full["w"])
    assert error < 0.1, error


def test_inside_inject_hyperparams():
  params, grads = params_and_grads()
  outer = optax.inject_hyperparams(
    lambda learning_rate: padam_jax.with_quantized_state(
      padam_jax.padam(learning_rate), min_size=256
    )
  )(learning_rate=0.1)
  inner = padam_jax.with_quantized_state(
    optax.inject_hyperparams(padam_jax.padam)(learning_rate=0.1), min_size=256
  )
  plain = padam_jax.padam(0.1)

  def first_updates(params, grads):
    state = outer.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    return [
      outer.update(grads, state, params),
      inner.update(grads, inner.init(params), params),
      plain.update(grads, plain.init(params), params)[0],
    ]

  (zero, state_outer), (updates, state_inner), expected = jax.jit(first_updates)(params, grads)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(zero))
  assert len(quantized(state_outer)) == 3 and len(quantized(state_inner)) == 3
  assert state_inner.inner_state.hyperparams["learning_rate"].dtype == jnp.float32
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5), updates, expected)


def test_sharded_state_follows_the_parameters_and_has_the_same_bits():
  tx = padam_jax.with_quantized_state(padam_jax.padam(0.1), min_size=256)
  params, grads = params_and_grads()
  step = jax.jit(functools.partial(run, tx, steps=2))
  reference = step(params, grads)
  for axis_type, spec in (
    (AxisType.Auto, PartitionSpec("fsdp", None)),
    (AxisType.Explicit, PartitionSpec(None, "fsdp")),  # blocks of 16 of the 16 columns a device has
  ):
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(axis_type,) * 2)
    with jax.set_mesh(mesh):
      sharding = {"w": NamedSharding(mesh, spec), "b": NamedSharding(mesh, PartitionSpec())}
      sharded_params = jax.device_put(params, sharding)
      updates, state = step(sharded_params, jax.device_put(grads, sharding))
      states = [state, tx.init(sharded_params)] if axis_type == AxisType.Explicit else [state]
    # The same codes; float32 arithmetic elsewhere may differ by an ulp between programs.
    for x, y in zip(quantized(state), quantized(reference[1]), strict=True):
      np.testing.assert_array_equal(x.codes, y.codes)
      np.testing.assert_array_equal(x.header, y.header)
    np.testing.assert_array_equal(updates["w"], reference[0]["w"])
    np.testing.assert_allclose(updates["b"], reference[0]["b"], rtol=1e-6)
    for state in states:
      for x in quantized(state):
        assert x.codes.sharding.is_equivalent_to(sharding["w"], 2), (spec, x.codes.sharding)
        assert x.header.sharding.is_equivalent_to(sharding["w"], 2), (spec, x.header.sharding)


def test_held_by_an_nnx_optimizer_eagerly_and_in_a_jitted_functional_step():
  from flax import nnx

  tx = padam_jax.with_quantized_state(padam_jax.padam(0.1))
  model = nnx.Linear(3072, 16, rngs=nnx.Rngs(0))  # the kernel is quantized, the bias is not
  grads = [
    jax.tree.map(lambda x, t=t: 1e-2 * jnp.cos(t * 7.0 * x), nnx.state(model, nnx.Param))
    for t in range(1, 5)
  ]
  # The same transformation through plain Optax on the same gradients.
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  state = tx.init(params)
  expected = []
  for g in grads:
    updates, state = tx.update(nnx.as_pure(g), state, params)
    params = optax.apply_updates(params, updates)
    expected.append(params)

  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graph, initial = nnx.split((model, optimizer))
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), initial)
  for x in optimizer.opt_state.quantized_arrays():  # mu, nu and nu_max of the kernel
    assert (x.codes.dtype, x.codes.shape, x.header.shape) == (jnp.uint8, (3072, 16), (3072, 1))
  assert len(optimizer.opt_state.quantized_arrays()) == 3

  def check(state, want):
    assert jax.tree.structure(state) == jax.tree.structure(initial)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes
    model = nnx.merge(graph, state)[0]
    got = nnx.as_pure(nnx.state(model, nnx.Param))
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), got, want)

  for g, want in zip(grads[:2], expected[:2], strict=True):
    optimizer.update(model, g)
    check(nnx.state((model, optimizer)), want)

  # As the trainers do: a functional step whose out_shardings come from the initial state.
  device = jax.devices()[0]
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), initial)

  @functools.partial(jax.jit, out_shardings=shardings)
  def step(state, grads):
    model, optimizer = nnx.merge(graph, state)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer))

  state = nnx.state((model, optimizer))
  for g, want in zip(grads[2:], expected[2:], strict=True):
    state = step(state, g)
    check(state, want)


def _primitives(jaxpr) -> set[str]:
  """The names of the primitives of ``jaxpr`` and of the jaxprs nested in it."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      names |= _primitives(sub)
  return names


# Padam's moments are per parameter: one part per parameter, in order. A global norm couples the
# parameters: that update runs whole.
@pytest.mark.parametrize(
  ("inner", "in_parts"),
  [
    pytest.param(lambda: padam_jax.padam(0.1, weight_decay=1e-3), True, id="padam"),
    pytest.param(
      lambda: optax.chain(optax.clip_by_global_norm(1e-3), optax.adam(1e-2)),
      False,
      id="clipped-adam",
      marks=pytest.mark.standard_promotion,  # optax.adam's bias correction mixes int and float
    ),
  ],
)
def test_leafwise_update_gives_the_same_bits_as_the_whole_one(inner, in_parts):
  params = {
    "w": jnp.linspace(-1.0, 1.0, 64 * 32).reshape(64, 32),
    "v": jnp.linspace(0.5, 2.0, 16 * 32).reshape(16, 32),
    "b": jnp.linspace(-0.1, 0.1, 32),
  }
  grads = jax.tree.map(lambda x: jnp.cos(7.0 * x) * 1e-2, params)
  runs = {}
  for leafwise in (True, False):
    tx = padam_jax.with_quantized_state(inner(), block_size=16, min_size=256, leafwise=leafwise)

    def steps(params, grads, tx=tx):
      state = tx.init(params)
      for t in range(3):
        updates, state = tx.update(jax.tree.map(lambda g, k=t + 1: k * g, grads), state, params)
        params = optax.apply_updates(params, updates)
      return params, state

    runs[leafwise] = jax.jit(steps)(params, grads)
    barriers = "optimization_barrier" in _primitives(jax.make_jaxpr(steps)(params, grads).jaxpr)
    assert barriers == (leafwise and in_parts)
  jax.tree.map(np.testing.assert_array_equal, runs[True], runs[False])


# A parameter with more than chunk_size elements is updated in slices of its rows: the same
# operations on the same values, so the same state, bit for bit (random bits included: they hash
# each element's index in the whole parameter). XLA fuses the parameters' last step (p + u)
# differently each way and may round it differently (contracting a multiply and an add), so the
# parameters agree to a float32 rounding.
@pytest.mark.parametrize(
  "inner, sliced",
  [
    pytest.param(lambda: padam_jax.padam(1e-2, p=0.125), True, id="padam"),
    # The trust ratio is a norm of the whole parameter: its rows are not independent.
    pytest.param(
      lambda: optax.chain(padam_jax.padam(1e-2, p=0.125), optax.scale_by_trust_ratio()),
      False,
      id="trust-ratio",
    ),
  ],
)
def test_large_parameters_are_updated_in_slices_of_rows_with_the_same_values(inner, sliced):
  rng = np.random.default_rng(0)
  params = {
    "w": jnp.asarray(rng.normal(size=(100, 64)), jnp.float32),  # slices of 32, 32, 32, 4 rows
    "t": jnp.asarray(rng.normal(size=(20, 8, 32)), jnp.float32),  # slices of 8, 8, 4 rows
    "b": jnp.asarray(rng.normal(size=(64,)), jnp.float32),  # one axis: whole
  }
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)]
  grads.append(jax.tree.map(lambda g: -0.5 * g, grads[0]))

  def step(tx):
    def apply(p, state, g):
      updates, state = tx.update(g, state, p)
      return optax.apply_updates(p, updates), state

    return jax.jit(apply)

  runs = {}
  for size in (None, 2048):
    tx = padam_jax.with_quantized_state(inner(), block_size=16, min_size=256, chunk_size=size)
    p, state = params, tx.init(params)
    for g in grads:
      p, state = step(tx)(p, state, g)
    runs[size] = p, state
  jax.tree.map(np.testing.assert_array_equal, runs[2048][1], runs[None][1])
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
    runs[2048][0],
    runs[None][0],
  )
  jaxpr = jax.make_jaxpr(step(tx))(params, state, grads[0]).jaxpr
  assert ("dynamic_update_slice" in _primitives(jaxpr)) == sliced


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match="bits must be 8"):
    padam_jax.with_quantized_state(optax.adam(1e-3), bits=4)
  with pytest.raises(ValueError, match="block_size must be a positive int"):
    padam_jax.with_quantized_state(optax.adam(1e-3), block_size=0)
  with pytest.raises(ValueError, match="min_size must be an int >= 0"):
    padam_jax.with_quantized_state(optax.adam(1e-3), min_size=-1)
  with pytest.raises(ValueError, match="chunk_size must be a positive int or None"):
    padam_jax.with_quantized_state(optax.adam(1e-3), chunk_size=0)
