"""8-bit optimizer state: any transformation's state kept as block-wise 8-bit codes.

:func:`with_quantized_state` wraps a transformation as ``optax.MultiSteps`` does: its state holds
the wrapped state with every large floating leaf replaced by its uint8 codes, and beside it the int8
block headers of those leaves. The state is decoded to float32 before ``update`` and encoded again
after it. It holds only arrays in NamedTuples, tuples and the wrapped state's own containers, so
that ``flax.nnx.Optimizer`` (which turns any other pytree node of a state into a nested
``nnx.State``) and ``out_shardings`` see it as they see any Optax state.

The encoding, per block of ``block_size`` consecutive elements along the last axis:

- one int8 header: the block's scale, a power of two ``2**E`` (``E`` in ``[-64, 63]``), and
  which code its elements use;
- a block whose elements are all ``>= 0`` (a second moment, a sum of squares) uses an unsigned
  8-bit float, 5 exponent bits and 3 mantissa bits (``e5m3``): 34 binades below the block's
  largest value, each split in 8 steps (relative spacing 1/16 to 1/8). A second moment spans many
  orders of magnitude, and the step depends on its relative error;
- any other block (a first moment) uses ``float8_e4m3fn``: a sign, 4 exponent bits, 3 mantissa
  bits, 18 binades.

A power-of-two scale is exact: a value that did not change is encoded to the same code after the
block's scale moved, so only the elements the wrapped ``update`` changed are rounded again. They are
rounded stochastically, with the random bits of :mod:`padam_jax._rounding`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from padam_jax import _leafwise, _rounding

# The block scale's exponent is stored in 7 bits (the header's eighth says which code).
_MIN_EXPONENT, _MAX_EXPONENT = -64, 63
# ``e5m3`` (unsigned): code c >= 8 is 2**((c >> 3) - 31) * (1 + (c & 7) / 8), the float32 whose
# bits are (c + _E5M3_OFFSET) << 20; c < 8 is c * 2**-33 (subnormal). Largest value 1.875.
_E5M3_OFFSET = 96 << 3
_E5M3_MAX = 1.875
_E5M3_MIN_NORMAL = 2.0**-30
_E5M3_SUBNORMAL = 2.0**-33
# ``float8_e4m3fn`` (signed): largest value 448 = 0.875 * 2**9.
_E4M3 = jnp.float8_e4m3fn
_E4M3_MAX = 448.0


class QuantizedArray(NamedTuple):
  """One quantized leaf of a :class:`QuantizedState`: its codes and block headers.

  The state keeps the two apart (the codes in place of the leaf, the headers in
  :attr:`QuantizedState.headers`); :meth:`QuantizedState.quantized_arrays` pairs them.

  Attributes:
    codes: uint8, the leaf's shape: one code per element.
    header: int8, the leaf's shape with the last axis divided by the block size: per block,
      ``2 * E + u``, the scale ``2**E`` and ``u = 1`` for the unsigned code (``e5m3``, a block
      of values ``>= 0``) or ``u = 0`` for the signed one (``float8_e4m3fn``).
  """

  codes: jax.Array
  header: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return self.codes.shape

  def dequantize(self, dtype: jax.typing.DTypeLike = jnp.float32) -> jax.Array:
    """The leaf, decoded (in ``dtype``)."""
    return decode(self.codes, self.header).astype(dtype)


def _header_list(headers: Any) -> list[Any]:
  """The entries of :attr:`QuantizedState.headers` (arrays, or ``None``), whatever holds them."""
  return jax.tree.leaves(headers, is_leaf=lambda x: x is None)


class QuantizedState(NamedTuple):
  """State of :func:`with_quantized_state`.

  Attributes:
    count: number of updates applied so far (int32); with each leaf's position, it seeds the
      stochastic rounding.
    inner_state: the wrapped transformation's state, each quantized leaf replaced by its codes
      (uint8, the leaf's shape).
    headers: a tuple with one entry per leaf of ``inner_state`` (in ``jax.tree.leaves`` order):
      the int8 block headers of a quantized leaf, ``None`` for a leaf kept as it is.
  """

  count: jax.Array
  inner_state: optax.OptState
  headers: tuple[jax.Array | None, ...]

  def quantized_arrays(self) -> list[QuantizedArray]:
    """The quantized leaves of :attr:`inner_state`, in ``jax.tree.leaves`` order."""
    leaves = jax.tree.leaves(self.inner_state)
    headers = _header_list(self.headers)
    return [QuantizedArray(x, h) for x, h in zip(leaves, headers, strict=True) if h is not None]

  def dequantize(self) -> optax.OptState:
    """:attr:`inner_state` with each quantized leaf decoded to float32."""
    return dequantize_tree(self.inner_state, self.headers)


def _power_of_two(exponent: jax.Array) -> jax.Array:
  """``2.0 ** exponent`` in float32, exactly, for int32 exponents in ``[-126, 127]``."""
  return jax.lax.bitcast_convert_type((exponent + 127) << 23, jnp.float32)


def _block_exponent(absmax: jax.Array, unsigned: jax.Array) -> jax.Array:
  """The least ``E`` with ``absmax * 2**-E`` at most the code's largest value (1.875 or 448)."""
  mantissa, exponent = jnp.frexp(absmax)  # absmax = mantissa * 2**exponent, mantissa in [1/2, 1)
  unsigned_e = exponent - 1 + (2 * mantissa > _E5M3_MAX).astype(jnp.int32)
  signed_e = exponent - 9 + (mantissa > _E4M3_MAX / 512).astype(jnp.int32)
  return jnp.clip(jnp.where(unsigned, unsigned_e, signed_e), _MIN_EXPONENT, _MAX_EXPONENT)


def _encode_e5m3(y: jax.Array, noise: jax.Array) -> jax.Array:
  """Codes of ``0 <= y <= 1.875``, rounded stochastically with the random uint32 ``noise``;
  larger values saturate."""
  # Normal: 20 random bits added below the 3 mantissa bits kept carry into them with the
  # probability of the dropped fraction.
  carried = jax.lax.bitcast_convert_type(y, jnp.uint32) + (noise >> 12)
  normal = (carried >> 20).astype(jnp.int32) - _E5M3_OFFSET
  # Subnormal: multiples of 2**-33, the integer part plus one with the fraction's probability.
  subnormal = jnp.floor(y * np.float32(1 / _E5M3_SUBNORMAL) + _rounding.uniform(noise))
  code = jnp.where(y >= _E5M3_MIN_NORMAL, normal, subnormal.astype(jnp.int32))
  return jnp.clip(code, 0, 255).astype(jnp.uint8)


def _decode_e5m3(codes: jax.Array) -> jax.Array:
  c = codes.astype(jnp.uint32)
  normal = jax.lax.bitcast_convert_type((c + _E5M3_OFFSET) << 20, jnp.float32)
  return jnp.where(c >= 8, normal, c.astype(jnp.float32) * np.float32(_E5M3_SUBNORMAL))


def _encode_e4m3(y: jax.Array, noise: jax.Array) -> jax.Array:
  """Codes of ``|y| <= 448`` in ``float8_e4m3fn``, rounded stochastically with the random
  uint32 ``noise``; larger values saturate."""
  y = jnp.clip(y, -_E4M3_MAX, _E4M3_MAX)
  return jax.lax.bitcast_convert_type(_rounding.stochastic_round(y, _E4M3, noise), jnp.uint8)


def _decode_e4m3(codes: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(codes, _E4M3).astype(jnp.float32)


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
  """``x`` with its last axis split into ``(blocks, block_size)``, sharded as ``x`` was."""
  shape = (*x.shape[:-1], x.shape[-1] // block_size, block_size)
  sharding = jax.typeof(x).sharding
  if sharding.mesh.empty or not sharding.mesh.are_all_axes_explicit:
    return x.reshape(shape)
  spec = (*sharding.spec, *(None,) * (x.ndim - len(sharding.spec)))
  out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec, None))
  return jnp.reshape(x, shape, out_sharding=out)


def encode(x: jax.Array, block_size: int, noise: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The codes (uint8, ``x``'s shape) and block headers (int8) of ``x``, whose last axis is a
  multiple of ``block_size``, rounded with the random bits ``noise`` (uint32, ``x``'s shape;
  ``2**31`` everywhere rounds to nearest)."""
  x = x.astype(jnp.float32)
  noise = _blocks(noise, block_size)
  blocks = _blocks(x, block_size)
  unsigned = jnp.all(blocks >= 0, axis=-1)
  exponent = _block_exponent(jnp.max(jnp.abs(blocks), axis=-1), unsigned)
  y = blocks * _power_of_two(-exponent)[..., None]
  codes = jnp.where(unsigned[..., None], _encode_e5m3(y, noise), _encode_e4m3(y, noise))
  header = (2 * exponent + unsigned.astype(jnp.int32)).astype(jnp.int8)
  return codes.reshape(x.shape), header


def decode(codes: jax.Array, header: jax.Array) -> jax.Array:
  """The float32 array that :func:`encode` gave ``codes`` and ``header`` for."""
  block_size = codes.shape[-1] // header.shape[-1]
  blocks = _blocks(codes, block_size)
  h = header.astype(jnp.int32)[..., None]
  unsigned = (h & 1) == 1
  values = jnp.where(unsigned, _decode_e5m3(blocks), _decode_e4m3(blocks))
  return (values * _power_of_two(h >> 1)).reshape(codes.shape)


def is_quantized(x: Any, block_size: int, min_size: int) -> bool:
  """Whether a state leaf is stored quantized: floating, at least ``min_size`` elements, the
  last axis a multiple of ``block_size``."""
  return (
    hasattr(x, "dtype")
    and jnp.issubdtype(x.dtype, jnp.floating)
    and x.ndim >= 1
    and math.prod(x.shape) >= min_size
    and x.shape[-1] % block_size == 0
  )


def quantize_tree(
  tree: Any, block_size: int, min_size: int, count: jax.typing.ArrayLike
) -> tuple[Any, tuple[jax.Array | None, ...]]:
  """``tree`` with the leaves :func:`is_quantized` selects replaced by their codes, and the
  headers (``None`` for a leaf kept as it is), one per leaf in ``jax.tree.leaves`` order. Leaf
  ``i`` draws its random bits from stream ``i``."""
  leaves, treedef = jax.tree.flatten(tree)
  encoded = [
    encode(x, block_size, _rounding.random_bits(x, count, i))
    if is_quantized(x, block_size, min_size)
    else (x, None)
    for i, x in enumerate(leaves)
  ]
  return treedef.unflatten([x for x, _ in encoded]), tuple(h for _, h in encoded)


def dequantize_tree(tree: Any, headers: Any, like: Any = None) -> Any:
  """``tree`` (with codes in place of its quantized leaves) decoded with ``headers`` (one per leaf,
  as :func:`quantize_tree` gives them): each quantized leaf in the dtype of the leaf at its
  position in ``like`` (e.g. a ``jax.eval_shape`` of the state), or in float32 if ``like`` is
  ``None``."""
  leaves, treedef = jax.tree.flatten(tree)
  headers = _header_list(headers)
  dtypes = [jnp.float32] * len(leaves) if like is None else [x.dtype for x in jax.tree.leaves(like)]
  if not len(headers) == len(dtypes) == len(leaves):
    raise ValueError(
      f"the quantized state has {len(leaves)} leaves and {len(headers)} headers, but the wrapped "
      f"transformation's state has {len(dtypes)} leaves"
    )
  decoded = [
    x if h is None else decode(x, h).astype(dtype)
    for x, h, dtype in zip(leaves, headers, dtypes, strict=True)
  ]
  return treedef.unflatten(decoded)


def _groups(tree: Any, params: jax.tree_util.PyTreeDef) -> list[int | None]:
  """Per leaf of ``tree``: the index of the parameter it belongs to, for the leaves of its subtrees
  shaped as the parameters (a per-parameter moment), None for the others (counters)."""

  def shaped(x: Any) -> bool:
    return jax.tree.structure(x) == params

  groups: list[int | None] = []
  for piece in jax.tree.leaves(tree, is_leaf=shaped):
    groups += list(range(params.num_leaves)) if shaped(piece) else [None]
  return groups


def _state_groups(state: Any, params: jax.tree_util.PyTreeDef) -> list[int | None]:
  """:func:`_groups` of a :class:`QuantizedState`: each header in its leaf's group."""
  inner = _groups(state.inner_state, params)
  headers = [g for g, h in zip(inner, _header_list(state.headers), strict=True) if h is not None]
  return [None, *inner, *headers]


def with_quantized_state(
  tx: optax.GradientTransformation,
  *,
  bits: int = 8,
  block_size: int = 16,
  min_size: int = 4096,
  leafwise: bool = True,
  chunk_size: int | None = 2**22,
) -> optax.GradientTransformationExtraArgs:
  r"""Keeps the state of ``tx`` in 8 bits per element: block-wise codes, stochastically rounded.

  Every floating leaf of ``tx``'s state with at least ``min_size`` elements and a last axis that
  is a multiple of ``block_size`` (for a per-parameter moment: the parameter's) is stored in 8
  bits: its codes, one uint8 per element, take its place in the state, and its headers, one int8
  per block of ``block_size`` consecutive elements along the last axis, are kept beside it in
  :attr:`QuantizedState.headers`. Other leaves (counters, injected hyperparameters, small
  parameters' moments) are kept as they are. The state holds only arrays, in the containers of
  ``tx``'s state and in tuples, so ``flax.nnx.Optimizer`` holds it and a jitted step places it
  with ``out_shardings`` as they do any Optax state. ``update`` decodes the state to float32
  (then to the dtypes of ``tx``'s state, from ``jax.eval_shape(tx.init, params)``, or of the
  updates when no ``params`` are given), calls ``tx.update`` and encodes the new state, rounding
  each element up or down at random with the probabilities that make it right in expectation.
  The random bits are a hash of the update count, the leaf's position in the state and the
  element's index: no key is needed, and they do not depend on how the state is laid out over
  devices.

  Each block has a power-of-two scale and one of two codes: a block whose elements are all
  ``>= 0`` (second moments, sums of squares) an unsigned 8-bit float with 5 exponent and 3
  mantissa bits (34 binades below the block's largest value), any other block (first moments)
  ``float8_e4m3fn`` (a sign, 4 exponent and 3 mantissa bits; 18 binades). Both keep a relative
  precision of 3 bits over a wide range, which is what a second moment needs: the step depends on
  its relative error, and its values span many orders of magnitude.

  Sharding: the codes have the leaf's shape and the headers its shape with the last axis divided
  by ``block_size``; both are sharded as the leaf (as its parameter). To place a state by hand,
  give a header its codes' ``PartitionSpec``. A block never straddles two devices when the last
  axis is whole on every device or split into parts that are multiples of ``block_size``.

  Padam's three float32 moments take 12 bytes per parameter; quantized, ``3 + 3 / block_size``:
  3.19 with ``block_size = 16``.

  Args:
    tx: the transformation whose state to keep in 8 bits, e.g. :func:`padam_jax.padam`,
      ``optax.adam(...)``, or one built by ``optax.inject_hyperparams``.
    bits: the width of a code; only 8 is implemented.
    block_size: elements per block along the last axis, ``>= 1``; smaller blocks adapt the scale
      to smaller regions and cost more headers.
    min_size: leaves with fewer elements are kept as they are.
    leafwise: decode, update and encode one parameter's state after another, so that the step's
      temporary buffers hold the float32 state of one parameter rather than of all (where the
      compiler keeps the order: XLA:TPU does, XLA:CPU does not). The values are the same. Where
      ``tx`` couples parameters (a global norm), the update runs whole.
    chunk_size: with ``leafwise``, a parameter with more elements (and two or more axes) is
      updated in slices of its rows of at most about this many elements, one after another, each
      written in place, so the temporaries hold one slice's float32 state, not the parameter's;
      the rows are sliced only where ``tx``'s update of a row reads that row alone (elementwise
      rules such as Padam and Adam), and the values are the same. On a mesh that splits a large
      parameter's first axis over devices, the slices would move rows between devices: pass
      ``None`` there to update each parameter whole.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is :class:`QuantizedState`; its
    ``update`` passes extra arguments on to ``tx``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import padam_jax
    >>> tx = padam_jax.with_quantized_state(padam_jax.padam(0.1), block_size=4, min_size=8)
    >>> params = jnp.linspace(-1.0, 1.0, 8)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(2 * params, state, params)
    >>> codes = state.inner_state[1].nu_max  # padam chains weight decay, the rule, the rate
    >>> nu_max = state.quantized_arrays()[-1]  # the leaves: mu, nu, nu_max
    >>> print(codes.dtype, nu_max.header.dtype, nu_max.header.shape)
    uint8 int8 (2,)
    >>> print(state.dequantize()[1].nu_max[-1])  # 0.004 = 1.024 * 2**-8, rounded to a neighbour
    0.00390625

  References:
    Dettmers, Lewis, Shleifer, Zettlemoyer, `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.
  """
  if bits != 8:
    raise ValueError(f"bits must be 8 (the only code width implemented), got {bits!r}")
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
    raise ValueError(f"min_size must be an int >= 0, got {min_size!r}")
  if chunk_size is not None and (
    isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
  ):
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
  inner = optax.with_extra_args_support(tx)

  def init_fn(params: optax.Params) -> QuantizedState:
    count = jnp.zeros([], jnp.int32)
    return QuantizedState(count, *quantize_tree(inner.init(params), block_size, min_size, count))

  def update_fn(
    updates: optax.Updates,
    state: QuantizedState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, QuantizedState]:
    # The dtypes of the wrapped state's leaves, from its abstract value (nothing is computed).
    like = jax.eval_shape(inner.init, updates if params is None else params)

    def whole(updates, state, params):
      inner_state = dequantize_tree(state.inner_state, state.headers, like)
      updates, inner_state = inner.update(updates, inner_state, params, **extra_args)
      count = optax.safe_increment(state.count)
      return updates, QuantizedState(
        count, *quantize_tree(inner_state, block_size, min_size, count)
      )

    treedef = jax.tree.structure(updates)
    # Parameters with a quantized leaf may run in slices (a float32 state's update needs no
    # temporaries whole).
    inner_groups = _groups(state.inner_state, treedef)
    headers = _header_list(state.headers)
    sliced = set()
    if chunk_size is not None:
      sliced = {g for g, h in zip(inner_groups, headers, strict=True) if h is not None}
    if not leafwise or (treedef.num_leaves < 2 and not sliced):
      return whole(updates, state, params)

    def groups(tree: tuple[Any, ...]) -> list[int | None]:
      # (updates, state[, params]): the updates and parameters by leaf, the state by _state_groups.
      parameters = list(range(treedef.num_leaves))
      return [
        g
        for part in tree
        if part is not None
        for g in (_state_groups(part, treedef) if isinstance(part, QuantizedState) else parameters)
      ]

    return _leafwise.call(whole, (updates, state, params), groups, chunk_size, sliced)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
