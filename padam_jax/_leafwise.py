"""Running a function of a whole parameter tree one parameter at a time, in a fixed order.

An optimizer update whose state is stored compactly decodes it to float32, updates it and encodes
it again. Traced as one function of the whole tree, the compiler is free to decode every leaf
before it encodes any, and the float32 copies of the whole state become the step's temporaries:
more memory at the peak than a float32 state needs. :func:`call` traces the function once, cuts
its program into one part per parameter (the operations its outputs for that parameter need), and
runs the parts in order, each behind an ``optimization_barrier`` that holds the previous part's
outputs: the next parameter's work cannot start before the last one's is done, so its temporaries
are freed first. The operations and their inputs are those of the whole function, so the results
are the same values.

When a parameter's outputs need another parameter's inputs (a global norm, say), the parts would
repeat that work for every parameter; :func:`call` then runs the function whole. A part for a large
parameter can itself run on slices of the parameter's rows, one after another
(:mod:`padam_jax._chunks`), where the compiler would otherwise hold its float32 state whole.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from typing import Any

import jax
from jax.extend import core

from padam_jax import _chunks

Group = int | None  # the parameter an array belongs to, or None for shared ones (counters, scalars)


def _needed(jaxpr: core.Jaxpr, outvars: Sequence[Any]) -> tuple[list[Any], set[Any]]:
  """The equations (in order) and the variables that ``outvars`` depend on."""
  needed = {v for v in outvars if isinstance(v, core.Var)}
  eqns = []
  for eqn in reversed(jaxpr.eqns):
    if any(v in needed for v in eqn.outvars if isinstance(v, core.Var)):
      eqns.append(eqn)
      needed.update(v for v in eqn.invars if isinstance(v, core.Var))
  return eqns[::-1], needed


def _parts(
  closed: core.ClosedJaxpr, in_groups: Sequence[Group], out_groups: Sequence[Group]
) -> list[tuple[list[int], core.ClosedJaxpr, list[Any]]] | None:
  """Per group of outputs (the parameters', then the shared ones): the outputs' positions, the
  program that computes them and its input variables; None when a group needs another's inputs."""
  jaxpr = closed.jaxpr
  group_of = dict(zip(jaxpr.invars, in_groups, strict=True))
  parts = []
  for group in [*sorted({g for g in out_groups if g is not None}), None]:
    outputs = [i for i, g in enumerate(out_groups) if g == group]
    if not outputs:
      continue
    outvars = [jaxpr.outvars[i] for i in outputs]
    eqns, needed = _needed(jaxpr, outvars)
    invars = [v for v in jaxpr.invars if v in needed]
    if any(group_of[v] not in (None, group) for v in invars):
      return None
    constvars = [v for v in jaxpr.constvars if v in needed]
    consts = [c for v, c in zip(jaxpr.constvars, closed.consts, strict=True) if v in needed]
    debug = core.DebugInfo(
      "leafwise", jaxpr.debug_info.func_src_info, (None,) * len(invars), (None,) * len(outvars)
    )
    part = core.Jaxpr(constvars, invars, outvars, eqns, jaxpr.effects, debug)
    parts.append((outputs, core.ClosedJaxpr(part, consts), invars))
  return parts


def _run_part(part: core.ClosedJaxpr, inputs: list[Any], chunk_size: int | None) -> list[Any]:
  """One part's outputs: on slices of rows of about ``chunk_size`` elements where it can be."""
  if chunk_size is not None:
    try:
      outs = _chunks.call(part, inputs, chunk_size)
    except _chunks.NotChunkable:
      outs = None
    if outs is not None:
      return outs
  return list(core.jaxpr_as_fun(part)(*inputs))


def call(
  fn: Callable[..., Any],
  args: Sequence[Any],
  groups: Callable[[Any], Sequence[Group]],
  chunk_size: int | None = None,
  chunk_groups: Container[int] = (),
) -> Any:
  """``fn(*args)``, computed one group of outputs after another.

  Args:
    fn: a function of pytrees of arrays returning a pytree of arrays.
    args: its arguments.
    groups: given ``args`` (as a tuple), or ``fn``'s output (as ``jax.ShapeDtypeStruct``), the
      group (parameter index) of each of its leaves, in ``jax.tree.leaves`` order: None for a leaf
      every group may read (a counter) or that only such leaves make.
    chunk_size: when given, the part of a group in ``chunk_groups`` whose outputs have more
      elements runs on slices of their rows of at most about this many elements, where
      :mod:`padam_jax._chunks` shows that the rows are independent (the values are the same).
    chunk_groups: the groups whose parts may run in slices.

  Returns:
    The output of ``fn(*args)``; computed whole when it has fewer than two groups (and none to
    run in slices), when ``groups`` does not give one per leaf, or when a group's outputs need
    another's inputs.
  """
  closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
  flat_args = jax.tree.leaves(args)
  out_tree = jax.tree.structure(shape)
  in_groups, out_groups = list(groups(tuple(args))), list(groups(shape))
  parts = None
  if (
    len(in_groups) == len(flat_args)
    and len(out_groups) == out_tree.num_leaves
    and len({g for g in out_groups if g is not None}) > (0 if chunk_groups else 1)
  ):
    parts = _parts(closed, in_groups, out_groups)
  if parts is None:
    return out_tree.unflatten(core.jaxpr_as_fun(closed)(*flat_args))
  index = {v: i for i, v in enumerate(closed.jaxpr.invars)}
  results: list[Any] = [None] * len(out_groups)
  previous: list[Any] = []
  for outputs, part, invars in parts:
    inputs = [flat_args[index[v]] for v in invars]
    if previous:  # nothing of this part starts before the previous part's outputs exist
      inputs, _ = jax.lax.optimization_barrier((inputs, previous))
    sliced = out_groups[outputs[0]] in chunk_groups
    previous = _run_part(part, inputs, chunk_size if sliced else None)
    for i, value in zip(outputs, previous, strict=True):
      results[i] = value
  return out_tree.unflatten(results)
