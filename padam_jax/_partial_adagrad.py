"""Partial Adagrad: Adagrad with the root of the gradient sum of squares to a partial power."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from padam_jax import _common, _validation
from padam_jax._common import ScalarOrSchedule


class ScaleByPartialRssState(NamedTuple):
  """State of :func:`scale_by_partial_rss`.

  Attributes:
    count: number of updates applied so far (int32), for a scheduled ``p``.
    sum_of_squares: the running sum of squared gradients ``G_t``.
  """

  count: jax.Array
  sum_of_squares: optax.Updates


def scale_by_partial_rss(
  p: ScalarOrSchedule = 0.125,
  initial_accumulator_value: jax.typing.ArrayLike = 0.0,
  eps: jax.typing.ArrayLike = 1e-10,
  *,
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""Rescales updates by the root of the sum of squared gradients to a partial power.

  .. math::

    G_t &= G_{t-1} + g_t^2, \qquad G_0 = \text{initial\_accumulator\_value} \\
    u_t &= g_t / (\sqrt{G_t} + \varepsilon)^{2p}

  ``eps`` is added to ``sqrt(G)`` before the power (PyTorch's Adagrad, whose
  defaults ``G_0 = 0``, ``eps = 1e-10`` are used here). At ``p = 1/2`` and
  ``eps = 0`` this is ``optax.scale_by_rss(initial_accumulator_value, eps=0)``
  (optax adds its ``eps`` inside the root); at ``p = 0`` it is the identity.

  Args:
    p: partially adaptive exponent in ``[0, 1/2]``, a number or a schedule.
    initial_accumulator_value: ``G_0 >= 0``.
    eps: added to ``sqrt(G)`` before the power; ``>= 0``.
    nu_dtype: optional dtype of the sum of squares ``G`` in the state (rounded
      stochastically when narrower than float32).

  Returns:
    An ``optax.GradientTransformation`` whose state is
    :class:`ScaleByPartialRssState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import padam_jax
    >>> tx = padam_jax.scale_by_partial_rss(p=0.25, eps=0.0)
    >>> updates, _ = tx.update(jnp.array([4.0, 0.0]), tx.init(jnp.zeros(2)))
    >>> print(updates.round(4))  # 4 / sqrt(16) ** 0.5
    [2. 0.]

  References:
    Duchi, Hazan, Singer, `Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization <https://jmlr.org/papers/v12/duchi11a.html>`_, JMLR 2011.

    Chen, Zhou, Tang, Yang, Cao, Gu, `Closing the Generalization Gap of Adaptive
    Gradient Methods in Training Deep Neural Networks
    <https://arxiv.org/abs/1806.06763>`_, IJCAI 2020 (Section 3).
  """
  _validation.check_partial_power(p)
  _validation.check_interval("initial_accumulator_value", initial_accumulator_value, 0.0)
  _validation.check_interval("eps", eps, 0.0)
  return _common.scale_by_partial_accumulator(
    ScaleByPartialRssState, p, eps, initial_accumulator_value, _sum_of_squares, nu_dtype
  )


def _sum_of_squares(g: jax.Array, s: jax.Array) -> jax.Array:
  return s + _common.squared_magnitude(_common.like_moment(g, s.dtype))


def partial_adagrad(
  learning_rate: ScalarOrSchedule = 0.1,
  p: ScalarOrSchedule = 0.125,
  initial_accumulator_value: jax.typing.ArrayLike = 0.0,
  eps: jax.typing.ArrayLike = 1e-10,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""Partially adaptive Adagrad.

  ``optax.chain(add_decayed_weights(weight_decay, mask),
  scale_by_partial_rss(p, initial_accumulator_value, eps),
  scale_by_learning_rate(learning_rate))``:

  .. math::

    x_{t+1} = x_t - \alpha_t \frac{g_t}{(\sqrt{G_t} + \varepsilon)^{2p}}

  Adagrad (PyTorch's form) at ``p = 1/2``, SGD at ``p = 0``. Weight decay is
  coupled L2.

  Args:
    learning_rate: step size, a number or an Optax schedule.
    p: partially adaptive exponent in ``[0, 1/2]`` (a number or a schedule).
    initial_accumulator_value: initial sum of squares.
    eps: added to ``sqrt(G)`` before the power.
    weight_decay: coupled L2 weight decay, ``>= 0``.
    mask: which parameters weight decay applies to, as in ``optax.adamw``.
    nu_dtype: optional dtype of the sum of squares in the state (rounded
      stochastically when narrower than float32).

  Returns:
    The optimizer, an ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import padam_jax
    >>> tx = padam_jax.partial_adagrad(learning_rate=0.1, p=0.125)
    >>> params = jnp.array([1.0, 2.0, 3.0])
    >>> state = tx.init(params)
    >>> for _ in range(200):
    ...   updates, state = tx.update(2 * params, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{jnp.sum(params ** 2):.2e}")
    3.11e-19

  References:
    Duchi, Hazan, Singer, `Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization <https://jmlr.org/papers/v12/duchi11a.html>`_, JMLR 2011.
  """
  return _common.coupled_l2(
    scale_by_partial_rss(p, initial_accumulator_value, eps, nu_dtype=nu_dtype),
    learning_rate,
    weight_decay,
    mask,
  )
