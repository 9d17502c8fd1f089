"""The Adam-like rules of the family: partial Adam, AMSGrad (Padam) and AdaMax as one rule.

The three keep a first moment ``m`` and a second-moment statistic ``v`` and step by
``c_t m_t / d(v_t)^(2p)``; they differ only in how ``v`` is updated, what the
denominator ``d`` is, the bias correction ``c_t`` and whether the running maximum of
``v`` is kept. :class:`SecondMoment` names the first three; the public factories
(``scale_by_partial_adam``, ``scale_by_partial_amsgrad``, ``scale_by_partial_adamax``)
are :func:`scale_by_partial_moments` with one of them, as Optax builds ``amsgrad`` and
``nadam`` from the pieces of ``adam``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from padam_jax import _common, _rounding, _validation
from padam_jax._common import ScalarOrSchedule


class SecondMoment(NamedTuple):
  """How an Adam-like rule keeps and uses its second-moment statistic.

  Attributes:
    update: ``(b2, eps, g, v) -> v_t``.
    denominator: ``(eps, v_t) -> d``, the base of the power ``2p``.
    correction: ``(b1, b2, count) -> c_t`` in float32, the bias correction.
  """

  update: Callable[[Any, Any, jax.Array, jax.Array], jax.Array]
  denominator: Callable[[Any, jax.Array], jax.Array]
  correction: Callable[[Any, Any, jax.Array], jax.Array]


def _adam_denominator(eps: jax.typing.ArrayLike, v: jax.Array) -> jax.Array:
  return jnp.sqrt(v) + jnp.asarray(eps, v.dtype)


def _infinity_norm(
  b2: jax.typing.ArrayLike, eps: jax.typing.ArrayLike, g: jax.Array, u: jax.Array
) -> jax.Array:
  magnitude = jnp.abs(_common.like_moment(g, u.dtype)).astype(u.dtype)  # real for complex g
  return jnp.maximum(jnp.asarray(b2, u.dtype) * u, magnitude + jnp.asarray(eps, u.dtype))


def _first_moment_correction(b1: Any, b2: Any, count: jax.Array) -> jax.Array:
  del b2
  return 1.0 / _common.one_minus_power(b1, count.astype(jnp.float32))


# Adam's ``v_t = b2 v + (1 - b2) g^2``, ``sqrt(v) + eps``, ``sqrt(1 - b2^t) / (1 - b1^t)``.
ADAM = SecondMoment(
  update=lambda b2, eps, g, v: _common.ema(b2, g, v, 2),
  denominator=_adam_denominator,
  correction=_common.bias_correction_factor,
)
# AdaMax's ``u_t = max(b2 u, |g| + eps)``, ``u`` itself, ``1 / (1 - b1^t)``.
ADAMAX = SecondMoment(
  update=_infinity_norm,
  denominator=lambda eps, u: u,
  correction=_first_moment_correction,
)


def init_moments(
  params: optax.Params,
  mu_dtype: jnp.dtype | None,
  nu_dtype: jnp.dtype | None = None,
  *,
  running_max: bool,
) -> dict[str, optax.Updates]:
  """Zero moments ``mu``, ``nu`` and, with ``running_max``, ``nu_max`` (real, of ``|g|``)."""
  moments = {
    "mu": _common.zeros_moment(params, mu_dtype),
    "nu": _common.zeros_moment(params, nu_dtype, real=True),
  }
  if running_max:
    moments["nu_max"] = _common.zeros_moment(params, nu_dtype, real=True)
  return moments


def update_moments(
  rule: SecondMoment,
  b1: jax.typing.ArrayLike,
  b2: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike,
  updates: optax.Updates,
  state: Any,
  *,
  running_max: bool,
  wide_mu: bool = False,
  wide_nu: bool = False,
) -> tuple[dict[str, optax.Updates], optax.Updates]:
  """The new moments (in the gradients' dtype) and the statistic the step divides by.

  With ``wide_mu`` (``wide_nu``) the first (second) moment is computed in float32 or wider
  whatever the dtypes of the gradients and of the state (set when ``mu_dtype``, ``nu_dtype``
  is given). The running maximum is of the raw ``v``, not of a bias-corrected one.
  """
  g_mu = jax.tree.map(_rounding.at_least_float32, updates) if wide_mu else updates
  mu = jax.tree.map(lambda g, m: _common.ema(b1, g, m, 1), g_mu, state.mu)
  if wide_nu:
    g_nu = jax.tree.map(_rounding.at_least_float32, updates)
    old = jax.tree.map(lambda g, v: v.astype(_common.real_dtype(g.dtype)), g_nu, state.nu)
  else:
    g_nu, old = updates, state.nu
  nu = jax.tree.map(lambda g, v: rule.update(b2, eps, g, v), g_nu, old)
  moments = {"mu": mu, "nu": nu}
  if not running_max:
    return moments, nu
  nu_max = jax.tree.map(lambda old, v: jnp.maximum(old.astype(v.dtype), v), state.nu_max, nu)
  moments["nu_max"] = nu_max
  return moments, nu_max


# The random streams of the moments' stochastic rounding (:func:`padam_jax._rounding.store_tree`).
# ``nu`` and ``nu_max`` share theirs: rounded with the same variate, ``v <= vhat`` stays true.
_STREAMS = {"mu": 1, "nu": 2, "nu_max": 2}


def cast_moments(
  moments: dict[str, optax.Updates], state: Any, count: jax.Array
) -> dict[str, optax.Updates]:
  """``moments`` in the dtypes of the same fields of ``state`` (``mu_dtype``, ``nu_dtype``),
  rounded stochastically (at step ``count``) into those narrower than float32."""
  return {
    name: _rounding.store_tree(value, getattr(state, name), count, _STREAMS[name])
    for name, value in moments.items()
  }


def scale_by_partial_moments(
  rule: SecondMoment,
  state_type: type[NamedTuple],
  p: ScalarOrSchedule,
  b1: jax.typing.ArrayLike,
  b2: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike,
  *,
  running_max: bool,
  bias_correction: bool,
  mu_dtype: jax.typing.DTypeLike | None,
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  """``u_t = c_t m_t / d(v_t)^(2p)`` for an Adam-like ``rule``.

  Args:
    rule: the second moment, denominator and bias correction.
    state_type: the state, a ``NamedTuple`` of ``count``, ``mu``, ``nu`` and, with
      ``running_max``, ``nu_max``.
    p: partially adaptive exponent in ``[0, 1/2]``, a number or a schedule.
    b1: decay rate of the first moment, in ``[0, 1)``.
    b2: decay rate of the second-moment statistic, in ``[0, 1)``.
    eps: the rule's ``eps``, ``>= 0``.
    running_max: whether the step divides by the running maximum of ``v`` (AMSGrad).
    bias_correction: whether to multiply by the rule's ``c_t``.
    mu_dtype: optional dtype of the first moment in the state.
    nu_dtype: optional dtype of ``nu`` (and ``nu_max``) in the state.

  Returns:
    An ``optax.GradientTransformation`` whose state is a ``state_type``.
  """
  _validation.check_partial_power(p)
  _validation.check_betas(b1, b2)
  _validation.check_interval("eps", eps, 0.0)
  mu_dtype = _validation.state_dtype("mu_dtype", mu_dtype, real=False)
  nu_dtype = _validation.state_dtype("nu_dtype", nu_dtype)

  def init_fn(params: optax.Params) -> Any:
    return state_type(
      count=jnp.zeros([], jnp.int32),
      **init_moments(params, mu_dtype, nu_dtype, running_max=running_max),
    )

  def update_fn(
    updates: optax.Updates, state: Any, params: optax.Params | None = None
  ) -> tuple[optax.Updates, Any]:
    del params
    count_inc = optax.safe_increment(state.count)
    two_p = _common.partial_exponent(p, state.count)
    scale = rule.correction(b1, b2, count_inc) if bias_correction else None
    moments, statistic = update_moments(
      rule,
      b1,
      b2,
      eps,
      updates,
      state,
      running_max=running_max,
      wide_mu=mu_dtype is not None,
      wide_nu=nu_dtype is not None,
    )

    def step(m, v):
      # d = 0 only where every gradient was 0, so m = 0 too: no step there. The guard
      # is needed when eps may be 0 in v's dtype (float16 rounds 1e-8 to 0).
      guard_zero = _common.eps_may_be_zero(eps, v.dtype)
      out = _common.partial_divide(m, rule.denominator(eps, v), two_p, guard_zero=guard_zero)
      return out if scale is None else scale.astype(out.dtype) * out

    steps = jax.tree.map(step, moments["mu"], statistic)
    if mu_dtype is not None:  # the moments were float32: the step in the gradients' dtype
      steps = _common.in_float_dtype_of(steps, updates)
    return steps, state_type(count=count_inc, **cast_moments(moments, state, count_inc))

  return optax.GradientTransformation(init_fn, update_fn)
