"""Stochastic rounding of optimizer state to narrow dtypes, with random bits derived from indices.

A state kept in bfloat16 cannot follow a slow moving average: with ``b2 = 0.999`` the second
moment moves by 0.1% of its gap per step, below bfloat16's resolution (8 significant bits), so
rounded to nearest it stops moving. Rounded stochastically, to the neighbour above with the
probability of the distance to the one below, it is right in expectation.

The random bits are a counter-based hash (no key, no state) of the step count, a stream number
(which moment of which leaf) and the element's global index in its array. The index comes from
``iota``, which XLA's partitioner hands out per shard, so a sharded array gets the bits of the
same array on one device: the same run gives the same state bits on any device layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Fractional part of the golden ratio, to spread consecutive integers over 32 bits.
_GOLDEN = np.uint32(0x9E3779B9)

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16}


def _mix(x: jax.Array) -> jax.Array:
  """A bijective 32-bit integer hash (C. Wellons' ``lowbias32``: multiply, xor-shift)."""
  x = x ^ (x >> 16)
  x = x * np.uint32(0x21F0AAAD)
  x = x ^ (x >> 15)
  x = x * np.uint32(0x735A2D97)
  return x ^ (x >> 15)


def global_index(x: jax.Array) -> jax.Array:
  """The flat (row-major) index of every element of ``x``, as uint32 (modulo ``2**32``).

  Built from one ``broadcasted_iota`` per axis, which the SPMD partitioner offsets for each
  shard, and given ``x``'s sharding when its mesh axes are explicit.
  """
  sharding = jax.typeof(x).sharding
  if sharding.mesh.empty or not sharding.mesh.are_all_axes_explicit:
    sharding = None
  index = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(x.ndim)):
    iota = jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis, out_sharding=sharding)
    index = index + iota * np.uint32(stride % 2**32)
    stride *= x.shape[axis]
  return index


def random_bits(x: jax.Array, count: jax.typing.ArrayLike, stream: int) -> jax.Array:
  """32 random bits per element of ``x``: a hash of ``count``, ``stream`` and the element's
  global index. The same arguments give the same bits, however ``x`` is sharded."""
  count = jnp.asarray(count).astype(jnp.uint32)
  key = _mix(_mix(count ^ _GOLDEN) ^ np.uint32((stream * 0x85EBCA6B + 0x632BE5AB) % 2**32))
  # One round per element: the key is already well mixed, and the round is a bijection with full
  # avalanche, so neighbouring indices get unrelated words (tests/test_state_dtype.py measures the
  # rounding's bias and the bits' balance).
  return _mix(global_index(x) ^ key)


def uniform(bits: jax.Array) -> jax.Array:
  """``bits`` as float32 uniform on ``[0, 1)``, on a grid of ``2**-24``."""
  return (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)


def is_narrow(dtype: jax.typing.DTypeLike) -> bool:
  """Whether ``dtype`` is a real floating type narrower than float32 (stochastically rounded)."""
  dtype = jnp.dtype(dtype)
  return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4


def stochastic_round(x: jax.Array, dtype: jax.typing.DTypeLike, bits: jax.Array) -> jax.Array:
  """``x`` (float32) rounded to the narrow float ``dtype``, up or down at random.

  Of the two neighbours ``lo <= x <= hi`` in ``dtype``, ``hi`` is taken with probability
  ``(x - lo) / (hi - lo)`` (the uniform variate from ``bits``), so the expected result is
  ``x``. Values of ``dtype`` come back unchanged; so do infinities and NaN. Values beyond
  ``dtype``'s range round as ``astype`` does, except in bfloat16, where one above the largest
  finite value rounds up to infinity with the probability of its distance.
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.bfloat16:
    return _stochastic_round_bfloat16(x, bits)
  nearest = x.astype(dtype)
  back = nearest.astype(jnp.float32)
  code = jax.lax.bitcast_convert_type(nearest, _UNSIGNED[dtype.itemsize])
  # The neighbour on the other side of x: one step of the magnitude away from or towards zero.
  away = jnp.abs(back) < jnp.abs(x)
  other = jax.lax.bitcast_convert_type(jnp.where(away, code + 1, code - 1), dtype)
  # Both differences are exact (Sterbenz); a NaN or infinite ratio never selects `other`.
  probability = (x - back) / (other.astype(jnp.float32) - back)
  return jnp.where(uniform(bits) < probability, other, nearest)


def _stochastic_round_bfloat16(x: jax.Array, bits: jax.Array) -> jax.Array:
  """:func:`stochastic_round` to bfloat16 in integer arithmetic: bfloat16 is the upper half of
  float32's bits, so adding 16 random bits to the lower half carries into the upper half with
  probability (lower half) / 2**16, the distance to the neighbour below in units of the gap:
  exactly unbiased for every float32, zeros, subnormals and infinities included (their lower half
  is 0 or carries nothing). A value above bfloat16's largest rounds up to infinity with that
  probability; NaN is kept as ``astype`` keeps it (a payload in the lower half only would
  truncate to infinity)."""
  word = jax.lax.bitcast_convert_type(x, jnp.uint32) + (bits >> 16)
  rounded = jax.lax.bitcast_convert_type((word >> 16).astype(jnp.uint16), jnp.bfloat16)
  return jnp.where(jnp.isnan(x), x.astype(jnp.bfloat16), rounded)


def store(
  value: jax.Array, dtype: jax.typing.DTypeLike, count: jax.typing.ArrayLike, stream: int
) -> jax.Array:
  """``value`` in the state's ``dtype``: unchanged in its own dtype, stochastically rounded
  (from float32) into a real dtype narrower than float32, cast otherwise."""
  dtype = jnp.dtype(dtype)
  if value.dtype == dtype:
    return value
  if not is_narrow(dtype) or jnp.iscomplexobj(value):
    return value.astype(dtype)
  value = value.astype(jnp.float32)
  return stochastic_round(value, dtype, random_bits(value, count, stream))


def store_tree(values: object, like: object, count: jax.typing.ArrayLike, field: int) -> object:
  """:func:`store` for every leaf of ``values`` in the dtype of the same leaf of ``like``.

  Leaf ``i`` (in ``jax.tree.leaves`` order) of state field ``field`` draws from stream
  ``64 * i + field``: each leaf and field its own bits, and the same ones on every step count.
  """
  leaves, treedef = jax.tree.flatten(values)
  dtypes = [x.dtype for x in treedef.flatten_up_to(like)]
  stored = [
    store(x, dtype, count, 64 * i + field)
    for i, (x, dtype) in enumerate(zip(leaves, dtypes, strict=True))
  ]
  return treedef.unflatten(stored)


def at_least_float32(g: jax.Array) -> jax.Array:
  """``g`` in float32 when it is a narrower float or an integer; float32, wider or complex, as is."""
  if jnp.issubdtype(g.dtype, jnp.inexact) and g.dtype.itemsize >= 4:
    return g
  return g.astype(jnp.float32)
