"""Partial Adadelta: Adadelta with its per-coordinate step-size ratio to a partial power."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from padam_jax import _common, _rounding, _validation
from padam_jax._common import ScalarOrSchedule


class ScaleByPartialAdadeltaState(NamedTuple):
  """State of :func:`scale_by_partial_adadelta`.

  Attributes:
    count: number of updates applied so far (int32), for a scheduled ``p``.
    e_g: moving average of the squared gradient.
    e_x: moving average of the squared update.
  """

  count: jax.Array
  e_g: optax.Updates
  e_x: optax.Updates


def scale_by_partial_adadelta(
  p: ScalarOrSchedule = 0.125,
  rho: jax.typing.ArrayLike = 0.9,
  eps: jax.typing.ArrayLike = 1e-6,
  *,
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""Rescales updates by Adadelta's ratio of root mean squares to a partial power.

  Adadelta multiplies the gradient by ``RMS[dx]_{t-1} / RMS[g]_t``; the partial
  version raises that ratio to the power ``2p``:

  .. math::

    E[g^2]_t &= \rho E[g^2]_{t-1} + (1 - \rho) g_t^2 \\
    u_t &= g_t \left( \frac{\sqrt{E[g^2]_t + \varepsilon}}
                          {\sqrt{E[u^2]_{t-1} + \varepsilon}} \right)^{-2p} \\
    E[u^2]_t &= \rho E[u^2]_{t-1} + (1 - \rho) u_t^2

  ``eps`` stays inside both roots, where Adadelta puts it. At ``p = 1/2`` this
  is ``optax.scale_by_adadelta(rho, eps)``; at ``p = 0`` it is the identity
  (SGD). The whole ratio, not only its denominator, is raised to ``2p``: the
  numerator is Adadelta's own step size, and without the power on it ``p = 0``
  would not be SGD.

  Args:
    p: partially adaptive exponent in ``[0, 1/2]``, a number or a schedule.
    rho: decay rate of both averages, in ``[0, 1)``.
    eps: added inside both roots; ``> 0`` (the first numerator is ``sqrt(eps)``).
    nu_dtype: optional dtype of both averages in the state (rounded
      stochastically when narrower than float32).

  Returns:
    An ``optax.GradientTransformation`` whose state is
    :class:`ScaleByPartialAdadeltaState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import padam_jax
    >>> tx = padam_jax.scale_by_partial_adadelta(p=0.0)
    >>> updates, _ = tx.update(jnp.array([4.0, 0.0]), tx.init(jnp.zeros(2)))
    >>> print(updates.round(4))  # p = 0: the gradient itself
    [4. 0.]

  References:
    Zeiler, `ADADELTA: An Adaptive Learning Rate Method
    <https://arxiv.org/abs/1212.5701>`_, 2012.

    Chen, Zhou, Tang, Yang, Cao, Gu, `Closing the Generalization Gap of Adaptive
    Gradient Methods in Training Deep Neural Networks
    <https://arxiv.org/abs/1806.06763>`_, IJCAI 2020 (Section 3).
  """
  _validation.check_partial_power(p)
  _validation.check_interval("rho", rho, 0.0, 1.0, high_open=True)
  _validation.check_interval(
    "eps", eps, 0.0, low_open=True, description="Adadelta's first step is sqrt(eps) * ..."
  )

  nu_dtype = _validation.state_dtype("nu_dtype", nu_dtype)

  def init_fn(params: optax.Params) -> ScaleByPartialAdadeltaState:
    return ScaleByPartialAdadeltaState(
      count=jnp.zeros([], jnp.int32),
      e_g=_common.zeros_moment(params, nu_dtype, real=True),
      e_x=_common.zeros_moment(params, nu_dtype, real=True),
    )

  def update_fn(
    updates: optax.Updates,
    state: ScaleByPartialAdadeltaState,
    params: optax.Params | None = None,
  ) -> tuple[optax.Updates, ScaleByPartialAdadeltaState]:
    del params
    two_p = _common.partial_exponent(p, state.count)
    grads = updates if nu_dtype is None else jax.tree.map(_rounding.at_least_float32, updates)
    e_g = jax.tree.map(lambda g, s: _common.ema(rho, g, s, 2), grads, state.e_g)
    prev_e_x = jax.tree.map(lambda g, s: _common.widen(s, g, nu_dtype), grads, state.e_x)

    def step(g, cur_e_g, prev_e_x):
      e = jnp.asarray(eps, cur_e_g.dtype)
      ratio = jnp.sqrt(cur_e_g + e) / jnp.sqrt(prev_e_x + e)  # > 0 since eps > 0
      return _common.partial_divide(
        _common.like_moment(g, cur_e_g.dtype), ratio, two_p, guard_zero=False
      )

    steps = jax.tree.map(step, grads, e_g, prev_e_x)
    e_x = jax.tree.map(lambda u, s: _common.ema(rho, u, s, 2), steps, prev_e_x)
    count = optax.safe_increment(state.count)
    if nu_dtype is not None:  # float32 averages: the step in the gradients' dtype, the state narrow
      steps = _common.in_float_dtype_of(steps, updates)
      e_g = _rounding.store_tree(e_g, state.e_g, count, 4)
      e_x = _rounding.store_tree(e_x, state.e_x, count, 5)
    return steps, ScaleByPartialAdadeltaState(count=count, e_g=e_g, e_x=e_x)

  return optax.GradientTransformation(init_fn, update_fn)


def partial_adadelta(
  learning_rate: ScalarOrSchedule = 1.0,
  p: ScalarOrSchedule = 0.125,
  rho: jax.typing.ArrayLike = 0.9,
  eps: jax.typing.ArrayLike = 1e-6,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""Partially adaptive Adadelta.

  ``optax.chain(add_decayed_weights(weight_decay, mask),
  scale_by_partial_adadelta(p, rho, eps), scale_by_learning_rate(learning_rate))``:
  Adadelta at ``p = 1/2`` (with PyTorch's learning-rate multiplier, 1 by
  default), SGD at ``p = 0``. Weight decay is coupled L2.

  Args:
    learning_rate: multiplier of the Adadelta step, a number or an Optax schedule.
    p: partially adaptive exponent in ``[0, 1/2]`` (a number or a schedule).
    rho: decay rate of both averages.
    eps: added inside both roots, ``> 0``.
    weight_decay: coupled L2 weight decay, ``>= 0``.
    mask: which parameters weight decay applies to, as in ``optax.adamw``.
    nu_dtype: optional dtype of both averages in the state (rounded
      stochastically when narrower than float32).

  Returns:
    The optimizer, an ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import padam_jax
    >>> tx = padam_jax.partial_adadelta(learning_rate=1.0, p=0.125)
    >>> params = jnp.array([1.0, 2.0, 3.0])
    >>> state = tx.init(params)
    >>> for _ in range(200):
    ...   updates, state = tx.update(2 * params, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{jnp.sum(params ** 2):.2e}")
    0.00e+00

  References:
    Zeiler, `ADADELTA: An Adaptive Learning Rate Method
    <https://arxiv.org/abs/1212.5701>`_, 2012.
  """
  return _common.coupled_l2(
    scale_by_partial_adadelta(p, rho, eps, nu_dtype=nu_dtype),
    learning_rate,
    weight_decay,
    mask,
  )
