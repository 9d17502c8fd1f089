"""Running a program of one parameter's arrays on slices of their rows, one slice after another.

An optimizer update of one large parameter decodes its state, updates it and encodes it again. A
compiler may hold float32 copies of the whole parameter's state while it does so; cut into slices of
rows that it runs one after another, it holds one slice's. :func:`call` runs a traced program
(a ``ClosedJaxpr``, such as one of :mod:`padam_jax._leafwise`'s parts) on slices of its arrays' first
axis: each slice of the inputs goes through the program's own operations, with the shapes the slice
gives them, and its outputs are written in place into the output arrays before the next slice
starts.

That is the same computation only when every row of an output depends on the same row of the inputs
alone, so the program is checked as it is run: elementwise operations, broadcasts, reshapes and
reductions that keep the first axis, and ``iota`` (offset by the slice's first row, so the indices,
and any random bits hashed from them, are those of the whole array). Anything else (a transpose, a
reduction over rows, a norm of the whole parameter) raises :class:`NotChunkable`, and the caller runs
the program whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core

# Operations whose every output element depends on the inputs' elements at the same index alone.
_ELEMENTWISE = frozenset(
  """abs acos acosh add and asin asinh atan atan2 atanh bitcast_convert_type cbrt ceil clamp clz
  convert_element_type copy copy_p cos cosh div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag
  integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or
  population_count pow real reduce_precision rem round rsqrt select_n shift_left
  shift_right_arithmetic shift_right_logical sign sin sinh sqrt square sub tan tanh xor""".split()
)
# Reductions, allowed over any axis but the first.
_REDUCTIONS = frozenset(
  "argmax argmin reduce_and reduce_max reduce_min reduce_or reduce_prod reduce_sum reduce_xor".split()
)
# Calls of a nested program, and the parameter that holds it.
_CALLS = {
  "jit": "jaxpr",
  "pjit": "jaxpr",
  "closed_call": "call_jaxpr",
  "core_call": "call_jaxpr",
  "custom_jvp_call": "call_jaxpr",
  "custom_vjp_call": "call_jaxpr",
}


Shape = tuple[int, ...]


class NotChunkable(Exception):
  """The program mixes rows: it cannot run on slices of them."""


class _Rows:
  """The slice being run: rows ``[start, start + size)`` of a first axis of ``extent`` rows."""

  def __init__(self, extent: int, start: int, size: int):
    self.extent, self.start, self.size = extent, start, size

  def cut(self, x: Any, axis: int = 0) -> Any:
    """``x``'s rows of the slice (along ``axis``)."""
    return jax.lax.slice_in_dim(x, self.start, self.start + self.size, axis=axis)


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(getattr(x, "shape", ()))


def _run(
  jaxpr: core.Jaxpr, consts: Sequence[Any], args: Sequence[Any], sliced: Sequence[bool], rows: _Rows
) -> tuple[list[Any], list[bool]]:
  """``jaxpr`` on ``args``, where ``sliced[i]`` says that ``args[i]`` holds the slice's rows of an
  array of ``rows.extent`` rows; returns the outputs and which of them are slices."""
  env: dict[Any, tuple[Any, bool]] = {}
  for v, x in zip(jaxpr.constvars, consts, strict=True):
    env[v] = (x, False)
  for v, x, s in zip(jaxpr.invars, args, sliced, strict=True):
    env[v] = (x, s)

  def read(v: Any) -> tuple[Any, bool]:
    return (v.val, False) if isinstance(v, core.Literal) else env[v]

  for eqn in jaxpr.eqns:
    values, flags = zip(*map(read, eqn.invars), strict=True) if eqn.invars else ((), ())
    outs, out_flags = _equation(eqn, list(values), list(flags), rows)
    for v, x, s in zip(eqn.outvars, outs, out_flags, strict=True):
      env[v] = (x, s)
  results = [read(v) for v in jaxpr.outvars]
  return [x for x, _ in results], [s for _, s in results]


def _equation(
  eqn: Any, values: list[Any], flags: list[bool], rows: _Rows
) -> tuple[list[Any], list[bool]]:
  """One equation on the slice: its outputs and which of them are slices."""
  name, params = eqn.primitive.name, dict(eqn.params)
  if name in _CALLS:
    inner = params[_CALLS[name]]
    if isinstance(inner, core.ClosedJaxpr):
      return _run(inner.jaxpr, inner.consts, values, flags, rows)
    return _run(inner, [], values, flags, rows)
  shape = tuple(eqn.outvars[0].aval.shape) if len(eqn.outvars) == 1 else ()
  creates_rows = shape[:1] == (rows.extent,) and name in ("iota", "broadcast_in_dim")
  if any(flags) or creates_rows:
    rule = _RULES.get(name)
    if rule is None:
      raise NotChunkable(f"{name} is not known to keep rows apart")
    values = rule(values, flags, params, shape, rows)
  out = eqn.primitive.bind(*values, **params)
  outs = list(out) if eqn.primitive.multiple_results else [out]
  sliced = any(flags) or creates_rows
  if creates_rows and name == "iota" and params["dimension"] == 0 and rows.start:
    outs = [outs[0] + jnp.asarray(rows.start, outs[0].dtype)]  # the whole array's indices
  return outs, [sliced] * len(outs)


# Each rule checks that an equation keeps the rows apart, and adapts its operands and parameters
# (in place) to the slice; it returns the operands.


def _iota(
  values: Sequence[Any], flags: Sequence[bool], params: dict[str, Any], shape: Shape, rows: _Rows
) -> list[Any]:
  params["shape"] = (rows.size, *shape[1:])
  return list(values)


def _broadcast(
  values: Sequence[Any], flags: Sequence[bool], params: dict[str, Any], shape: Shape, rows: _Rows
) -> list[Any]:
  x, dims = values[0], tuple(params["broadcast_dimensions"])
  first = dims.index(0) if 0 in dims else None  # the operand axis that becomes the first
  if shape[:1] != (rows.extent,):
    raise NotChunkable(f"broadcast of a slice to {shape}")
  if flags[0] and first != 0:
    raise NotChunkable("broadcast that moves the rows' axis")
  if not flags[0] and first is not None and _shape(x)[first] != 1:
    x = rows.cut(x, axis=first)
  params["shape"] = (rows.size, *shape[1:])
  return [x]


def _elementwise(
  values: Sequence[Any], flags: Sequence[bool], params: dict[str, Any], shape: Shape, rows: _Rows
) -> list[Any]:
  if shape[:1] != (rows.extent,):
    raise NotChunkable(f"an elementwise operation to shape {shape}")
  values = list(values)
  for i, sliced in enumerate(flags):
    operand = _shape(values[i])
    if sliced or not operand or operand[0] == 1:
      continue  # a slice, or the same for every row
    if len(operand) != len(shape) or operand[0] != rows.extent:
      raise NotChunkable(f"an elementwise operation of a slice and an array of shape {operand}")
    values[i] = rows.cut(values[i])
  return list(values)


def _reshape(
  values: Sequence[Any], flags: Sequence[bool], params: dict[str, Any], shape: Shape, rows: _Rows
) -> list[Any]:
  new = tuple(params["new_sizes"])
  if params.get("dimensions") is not None or new[:1] != (rows.extent,) or not flags[0]:
    raise NotChunkable(f"reshape to {new}")
  params["new_sizes"] = (rows.size, *new[1:])
  return list(values)


def _reduction(
  values: Sequence[Any], flags: Sequence[bool], params: dict[str, Any], shape: Shape, rows: _Rows
) -> list[Any]:
  axes = params.get("axes", params.get("dimensions", ()))
  if 0 in axes or len(values) != 1:
    raise NotChunkable(f"reduction over axes {axes}")
  return list(values)


_RULES = {
  "iota": _iota,
  "broadcast_in_dim": _broadcast,
  **dict.fromkeys(_ELEMENTWISE, _elementwise),
  "reshape": _reshape,
  "squeeze": _reduction,
  **dict.fromkeys(_REDUCTIONS, _reduction),
}


def _slices(closed: core.ClosedJaxpr, chunk_size: int) -> tuple[int, int] | None:
  """The outputs' rows and the rows of a slice, or None when the program is not worth slicing."""
  shapes = [tuple(v.aval.shape) for v in closed.jaxpr.outvars]
  if not shapes or any(len(s) < 2 for s in shapes) or len({s[0] for s in shapes}) != 1:
    return None
  extent = shapes[0][0]
  row_size = max(math.prod(s[1:]) for s in shapes)
  if extent * row_size <= chunk_size:
    return None
  slices = -(-extent // max(1, chunk_size // row_size))
  size = -(-extent // slices)  # slices of equal rows, the last one shorter
  if size >= 8:
    size += -size % 8  # whole tiles of rows on accelerators that tile by 8
  return extent, size


def _bases(outvars: Sequence[Any], args: Sequence[Any], sliced: Sequence[bool]) -> list[int | None]:
  """Per output, an input of its shape and dtype to write it into (each used once), or None."""
  free = [i for i, s in enumerate(sliced) if s]
  bases: list[int | None] = []
  for v in outvars:
    like = [
      i for i in free if _shape(args[i]) == tuple(v.aval.shape) and args[i].dtype == v.aval.dtype
    ]
    if like:
      free.remove(like[0])
    bases.append(like[0] if like else None)
  return bases


def call(closed: core.ClosedJaxpr, args: Sequence[Any], chunk_size: int) -> list[Any] | None:
  """The outputs of ``closed`` on ``args``, computed on slices of rows of at most about
  ``chunk_size`` elements, or None when the program is not worth slicing (every output has fewer
  elements, or they do not share a first axis of two or more rows).

  The inputs whose first axis has the outputs' rows are sliced; the others (counters, scalars) are
  read whole by every slice. Each output is written in place: into an input of its shape and dtype
  (whose rows of a slice are read before the slice writes them, so a donated state is updated
  where it lies), or into a new array.

  Raises:
    NotChunkable: the program mixes rows.
  """
  plan = _slices(closed, chunk_size)
  if plan is None:
    return None
  extent, size = plan
  sliced = [len(_shape(x)) >= 2 and _shape(x)[0] == extent for x in args]
  bases = _bases(closed.jaxpr.outvars, args, sliced)
  buffers = [
    args[i] if i is not None else jnp.zeros(v.aval.shape, v.aval.dtype)
    for i, v in zip(bases, closed.jaxpr.outvars, strict=True)
  ]
  holds = {i: k for k, i in enumerate(bases) if i is not None}  # input -> the output it becomes
  for start in range(0, extent, size):
    rows = _Rows(extent, start, min(size, extent - start))
    inputs = [
      rows.cut(buffers[holds[i]] if i in holds else x) if s else x
      for i, (x, s) in enumerate(zip(args, sliced, strict=True))
    ]
    outs, flags = _run(closed.jaxpr, closed.consts, inputs, sliced, rows)
    if not all(flags):
      raise NotChunkable("an output does not follow the rows")
    buffers = [
      jax.lax.dynamic_update_slice_in_dim(b, o, start, axis=0)
      for b, o in zip(buffers, outs, strict=True)
    ]
    if start + size < extent:  # the next slice starts after this one is written
      buffers = list(jax.lax.optimization_barrier(buffers))
  return buffers
