"""Pieces shared by every rule: hyperparameter evaluation, moments, bias correction, partial division."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from padam_jax import _power, _rounding, _validation

ScalarOrSchedule = jax.typing.ArrayLike | Callable[[jax.typing.ArrayLike], jax.typing.ArrayLike]


def evaluate(value: ScalarOrSchedule, count: jax.Array) -> jax.typing.ArrayLike:
  """Returns a hyperparameter at a step: a schedule called on ``count``, a number as is."""
  return value(count) if callable(value) else value


def partial_exponent(p: ScalarOrSchedule, count: jax.Array) -> jax.typing.ArrayLike:
  """The exponent ``2p`` at a step, with ``p`` clipped into ``[0, 1/2]`` when it is not known
  when the optimizer is built.

  A number was checked by the factory and is used as given (a Python number keeps
  :func:`padam_jax._power.inverse_power`'s forms chosen while tracing). A schedule's
  value and a traced ``p`` (``optax.inject_hyperparams`` under ``jit``) cannot be
  checked: they are clipped, so ``p`` beyond ``1/2`` acts as ``1/2`` and below 0 as 0
  (NaN stays NaN).
  """
  value = evaluate(p, count)
  if not (callable(p) or isinstance(p, jax.core.Tracer)):
    return 2 * value
  if _power.static_exponent(value) is not None:  # a schedule that returns Python numbers
    return 2 * min(max(float(value), 0.0), 0.5)
  return 2 * jnp.clip(value, 0.0, 0.5)


_HALF_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def one_minus_power(decay: jax.typing.ArrayLike, t: jax.Array) -> jax.Array:
  """``1 - decay**t`` in float32 without the cancellation of the direct form.

  ``1 - 0.999**t`` loses ~5 significant digits in float32 at small ``t`` (0.999
  itself is only float32-exact to 1e-8); ``-expm1(t * log(decay))`` with the
  logarithm taken in double precision when ``decay`` is a Python number keeps it
  to float32 round-off, as the reference code's float64 arithmetic does.
  """
  value = _validation.concrete_float(decay)
  if value is not None:
    if value == 0.0:
      return jnp.ones_like(t)
    log_decay = jnp.asarray(math.log(value), jnp.float32)
  else:
    log_decay = jnp.log(jnp.asarray(decay, jnp.float32))
  return -jnp.expm1(t * log_decay)


def bias_correction_factor(
  b1: jax.typing.ArrayLike, b2: jax.typing.ArrayLike, count: jax.Array
) -> jax.Array:
  """Adam's ``sqrt(1 - b2^t) / (1 - b1^t)`` in float32, for ``t = count >= 1``."""
  t = count.astype(jnp.float32)
  return jnp.sqrt(one_minus_power(b2, t)) / one_minus_power(b1, t)


def float_dtype(dtype: jax.typing.DTypeLike) -> jnp.dtype:
  """The dtype moments are kept in: ``dtype`` if inexact, else JAX's default float.

  Integer parameters get float moments and float updates, as Optax's own
  optimizers produce.
  """
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.inexact):
    return dtype
  return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float_))


def in_float_dtype_of(steps: optax.Updates, updates: optax.Updates) -> optax.Updates:
  """``steps`` cast to the :func:`float_dtype` of the gradients ``updates``."""
  return jax.tree.map(lambda u, g: u.astype(float_dtype(g.dtype)), steps, updates)


def real_dtype(dtype: jax.typing.DTypeLike) -> jnp.dtype:
  """The dtype of second moments: :func:`float_dtype`, real (float32 for complex64)."""
  return jnp.finfo(float_dtype(dtype)).dtype


def like_moment(g: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """``g`` in the real moment dtype ``dtype``, or in its complex counterpart if ``g`` is complex."""
  if jnp.iscomplexobj(g):
    return g.astype(jnp.complex128 if dtype == jnp.float64 else jnp.complex64)
  return g.astype(dtype)


def zeros_moment(
  params: optax.Params, dtype: jax.typing.DTypeLike | None = None, *, real: bool = False
) -> optax.Params:
  """Zeros shaped like ``params`` in ``dtype`` or in each leaf's :func:`float_dtype`
  (:func:`real_dtype` with ``real``, for the moments of ``|g|^2``)."""
  leaf_dtype = real_dtype if real else float_dtype
  return jax.tree.map(lambda x: jnp.zeros_like(x, dtype=dtype or leaf_dtype(x.dtype)), params)


def eps_may_be_zero(eps: Any, dtype: jax.typing.DTypeLike | None = None) -> bool:
  """Whether ``eps`` may be zero at run time, so ``0 ** -q`` must be guarded.

  With ``dtype``, ``eps`` as rounded to it: float16 rounds the usual 1e-8 to 0.
  """
  value = _validation.concrete_float(eps)
  if value is not None and dtype is not None:
    value = float(np.asarray(value, dtype))
  return value is None or value == 0.0


def squared_magnitude(g: jax.Array) -> jax.Array:
  """``|g|^2``, real: ``g * g``, or ``re^2 + im^2`` for complex ``g`` (as Optax's moments)."""
  if jnp.iscomplexobj(g):
    re, im = jnp.real(g), jnp.imag(g)
    return re * re + im * im
  return g * g


def ema(decay: jax.typing.ArrayLike, g: jax.Array, old: jax.Array, order: int) -> jax.Array:
  """``decay * old + (1 - decay) * g`` (order 1) or ``... * |g|^2`` (order 2, real), in the
  gradient's float dtype."""
  g = g.astype(float_dtype(g.dtype))
  term = g if order == 1 else squared_magnitude(g)
  dtype = term.dtype
  # 1 - decay before rounding to float32, as in Padam: 1 - float32(0.999) is off by 1e-5.
  weight = jnp.asarray(1 - decay, dtype)
  if _validation.concrete_float(decay) == 0.0:
    # No memory: 0 * old would turn a moment that overflowed (float16) into NaN.
    return weight * term
  return jnp.asarray(decay, dtype) * old.astype(dtype) + weight * term


def partial_divide(
  numerator: jax.Array,
  denominator: jax.Array,
  two_p: jax.typing.ArrayLike,
  *,
  guard_zero: bool,
) -> jax.Array:
  """``numerator / denominator ** two_p`` through :func:`padam_jax._power.inverse_power`.

  With ``guard_zero`` a zero denominator gives a zero result: the rules only
  meet ``0 ** -q`` where the recent gradients were all zero (every one so far, or
  all those a decayed accumulator still remembers), so the numerator is zero as
  well and ``0 / 0`` means "no step". The denominator is real; the
  numerator may be complex. In float16 and bfloat16 the power and the product are
  taken in float32 (``1 / 1e-5`` overflows float16) and rounded once.
  """
  if denominator.dtype in _HALF_DTYPES and not jnp.iscomplexobj(numerator):
    power = _power.inverse_power(denominator.astype(jnp.float32), two_p)
    out = (numerator.astype(jnp.float32) * power).astype(numerator.dtype)
  else:
    power = _power.inverse_power(denominator, two_p)
    out = numerator * (power if power.dtype == numerator.dtype else power.astype(numerator.dtype))
  if guard_zero:
    out = jnp.where(denominator == 0, jnp.zeros_like(out), out)
  return out


def add_decayed_weights(weight_decay: ScalarOrSchedule, mask: Any) -> optax.GradientTransformation:
  """``optax.add_decayed_weights`` that asks for ``params`` only when it decays.

  With ``weight_decay`` a concrete 0, ``update(updates, state)`` without ``params``
  passes the updates through (as Optax's own 0 does when given ``params``); with any
  other value, a missing ``params`` is a ``ValueError`` naming ``weight_decay``. The
  state is Optax's, unchanged.
  """
  inner = optax.add_decayed_weights(weight_decay, mask)
  no_decay = _validation.concrete_float(weight_decay) == 0.0

  def update_fn(
    updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, optax.OptState]:
    if params is not None:
      return inner.update(updates, state, params)
    if no_decay:
      return updates, state
    raise ValueError(
      f"weight_decay={weight_decay!r} needs the parameters: call update(updates, state, params)"
    )

  return optax.GradientTransformation(inner.init, update_fn)


def coupled_l2(
  scale: optax.GradientTransformation,
  learning_rate: ScalarOrSchedule,
  weight_decay: jax.typing.ArrayLike,
  mask: Any,
) -> optax.GradientTransformation:
  """The aliases' chain: coupled L2 (added to the gradient, as the reference code does), the
  rule's rescaling, then the learning rate. Checks ``weight_decay >= 0``."""
  _validation.check_interval("weight_decay", weight_decay, 0.0)
  return optax.chain(
    add_decayed_weights(weight_decay, mask),
    scale,
    optax.scale_by_learning_rate(learning_rate),
  )


def widen(stored: jax.Array, g: jax.Array, state_dtype: jax.typing.DTypeLike | None) -> jax.Array:
  """A stored second-moment statistic in the real dtype of the (widened) gradient ``g`` when
  the state has a dtype of its own (``nu_dtype``), else as stored."""
  return stored if state_dtype is None else stored.astype(real_dtype(g.dtype))


def scale_by_partial_accumulator(
  state_type: type[NamedTuple],
  p: ScalarOrSchedule,
  eps: jax.typing.ArrayLike,
  initial_value: jax.typing.ArrayLike,
  accumulate: Callable[[jax.Array, jax.Array], jax.Array],
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  """``u_t = g_t / (sqrt(s_t) + eps)^(2p)`` for a running accumulator ``s_t`` of squares.

  The shared skeleton of partial RMSprop (a moving average) and partial Adagrad (a sum).

  Args:
    state_type: the state, a ``NamedTuple`` of a step count then the accumulator.
    p: partially adaptive exponent in ``[0, 1/2]``, a number or a schedule.
    eps: added to ``sqrt(s)`` before the power, ``>= 0``.
    initial_value: ``s_0 >= 0``.
    accumulate: ``(g, s_{t-1}) -> s_t``.
    nu_dtype: optional dtype of the accumulator in the state; it is then updated in float32
      (or the gradients' dtype if wider) and rounded stochastically into a narrower dtype.

  Returns:
    An ``optax.GradientTransformation`` whose state is a ``state_type``.
  """
  nu_dtype = _validation.state_dtype("nu_dtype", nu_dtype)

  def init_fn(params: optax.Params) -> NamedTuple:
    initial = jax.tree.map(
      lambda x: jnp.full_like(x, initial_value, dtype=nu_dtype or real_dtype(x.dtype)), params
    )
    return state_type(jnp.zeros([], jnp.int32), initial)

  def update_fn(
    updates: optax.Updates, state: NamedTuple, params: optax.Params | None = None
  ) -> tuple[optax.Updates, NamedTuple]:
    del params
    count, stored = state
    exponent = partial_exponent(p, count)
    grads = updates if nu_dtype is None else jax.tree.map(_rounding.at_least_float32, updates)
    accumulator = jax.tree.map(lambda g, s: accumulate(g, widen(s, g, nu_dtype)), grads, stored)

    def step(g, s):
      denom = jnp.sqrt(s) + jnp.asarray(eps, s.dtype)
      # Not only from the start: a moving average with decay 0, or an initial value that decays
      # below the dtype's range, reaches 0 again.
      guard_zero = eps_may_be_zero(eps, s.dtype)
      return partial_divide(like_moment(g, s.dtype), denom, exponent, guard_zero=guard_zero)

    steps = jax.tree.map(step, updates, accumulator)
    if nu_dtype is not None:  # the accumulator was float32: the step in the gradients' dtype
      steps = in_float_dtype_of(steps, updates)
    count_inc = optax.safe_increment(count)
    return steps, state_type(count_inc, _rounding.store_tree(accumulator, stored, count_inc, 3))

  return optax.GradientTransformation(init_fn, update_fn)
