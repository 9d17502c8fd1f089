"""Partial RMSprop: RMSprop with the root-mean-square to a partial power."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from padam_jax import _common, _validation
from padam_jax._common import ScalarOrSchedule


class ScaleByPartialRmsState(NamedTuple):
  """State of :func:`scale_by_partial_rms`.

  Attributes:
    count: number of updates applied so far (int32), for a scheduled ``p``.
    nu: moving average of the squared gradient ``v_t``.
  """

  count: jax.Array
  nu: optax.Updates


def scale_by_partial_rms(
  p: ScalarOrSchedule = 0.125,
  decay: jax.typing.ArrayLike = 0.9,
  eps: jax.typing.ArrayLike = 1e-8,
  initial_scale: jax.typing.ArrayLike = 0.0,
  *,
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""Rescales updates by the root mean square of past gradients to a partial power.

  .. math::

    v_t &= \rho v_{t-1} + (1 - \rho) g_t^2, \qquad v_0 = \text{initial\_scale} \\
    u_t &= g_t / (\sqrt{v_t} + \varepsilon)^{2p}

  ``eps`` is added to ``sqrt(v)`` before the power, as Padam does; RMSprop has
  no bias correction. At ``p = 1/2`` this is
  ``optax.scale_by_rms(decay, eps, initial_scale, eps_in_sqrt=False)`` (PyTorch's
  RMSprop); at ``p = 0`` it is the identity.

  Args:
    p: partially adaptive exponent in ``[0, 1/2]``, a number or a schedule.
    decay: decay rate ``rho`` of the squared-gradient average, in ``[0, 1)``.
    eps: added to ``sqrt(v)`` before the power; ``>= 0``.
    initial_scale: initial value of ``v``; ``>= 0``.
    nu_dtype: optional dtype of ``v`` in the state (rounded
      stochastically when narrower than float32).

  Returns:
    An ``optax.GradientTransformation`` whose state is
    :class:`ScaleByPartialRmsState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import padam_jax
    >>> tx = padam_jax.scale_by_partial_rms(p=0.25, decay=0.75)
    >>> updates, _ = tx.update(jnp.array([4.0, 0.0]), tx.init(jnp.zeros(2)))
    >>> print(updates.round(4))  # 4 / sqrt(0.25 * 16) ** 0.5
    [2.8284 0.    ]

  References:
    Tieleman, Hinton, Lecture 6.5 (RMSprop), COURSERA: Neural Networks for
    Machine Learning, 2012.

    Chen, Zhou, Tang, Yang, Cao, Gu, `Closing the Generalization Gap of Adaptive
    Gradient Methods in Training Deep Neural Networks
    <https://arxiv.org/abs/1806.06763>`_, IJCAI 2020 (Section 3).
  """
  _validation.check_partial_power(p)
  _validation.check_interval("decay", decay, 0.0, 1.0, high_open=True)
  _validation.check_interval("eps", eps, 0.0)
  _validation.check_interval("initial_scale", initial_scale, 0.0)
  return _common.scale_by_partial_accumulator(
    ScaleByPartialRmsState,
    p,
    eps,
    initial_scale,
    lambda g, v: _common.ema(decay, g, v, 2),
    nu_dtype,
  )


def partial_rmsprop(
  learning_rate: ScalarOrSchedule = 0.01,
  p: ScalarOrSchedule = 0.125,
  decay: jax.typing.ArrayLike = 0.9,
  eps: jax.typing.ArrayLike = 1e-8,
  initial_scale: jax.typing.ArrayLike = 0.0,
  momentum: jax.typing.ArrayLike | None = None,
  nesterov: bool = False,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""Partially adaptive RMSprop.

  ``optax.chain(add_decayed_weights(weight_decay, mask), scale_by_partial_rms(p,
  decay, eps, initial_scale), trace(momentum, nesterov),
  scale_by_learning_rate(learning_rate))``, the trace only when ``momentum`` is
  given:

  .. math::

    b_t = \mu b_{t-1} + \frac{g_t}{(\sqrt{v_t} + \varepsilon)^{2p}}, \qquad
    x_{t+1} = x_t - \alpha_t b_t

  which is PyTorch's RMSprop at ``p = 1/2`` (the momentum buffer holds the
  rescaled gradients and the learning rate multiplies the buffer), and SGD with
  (heavy-ball) momentum ``mu`` at ``p = 0``. Weight decay is coupled L2.

  Args:
    learning_rate: step size, a number or an Optax schedule.
    p: partially adaptive exponent in ``[0, 1/2]`` (a number or a schedule).
    decay: decay rate of the squared-gradient average.
    eps: added to ``sqrt(v)`` before the power.
    initial_scale: initial value of the squared-gradient average.
    momentum: optional momentum ``mu`` (``None``: no momentum).
    nesterov: whether the momentum is Nesterov's.
    weight_decay: coupled L2 weight decay, ``>= 0``.
    mask: which parameters weight decay applies to, as in ``optax.adamw``.
    nu_dtype: optional dtype of the squared-gradient average in the state (rounded
      stochastically when narrower than float32).

  Returns:
    The optimizer, an ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import padam_jax
    >>> tx = padam_jax.partial_rmsprop(learning_rate=0.01, p=0.125, momentum=0.9)
    >>> params = jnp.array([1.0, 2.0, 3.0])
    >>> state = tx.init(params)
    >>> for _ in range(200):
    ...   updates, state = tx.update(2 * params, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{jnp.sum(params ** 2):.2e}")
    5.90e-10

  References:
    Those of :func:`scale_by_partial_rms` (Tieleman and Hinton's RMSprop; Chen et al.,
    IJCAI 2020, Section 3).
  """
  _validation.check_interval("weight_decay", weight_decay, 0.0)
  if momentum is not None:
    _validation.check_interval("momentum", momentum, 0.0, 1.0, high_open=True)
  return optax.chain(
    _common.add_decayed_weights(weight_decay, mask),
    scale_by_partial_rms(p, decay, eps, initial_scale, nu_dtype=nu_dtype),
    optax.trace(momentum, nesterov) if momentum is not None else optax.identity(),
    optax.scale_by_learning_rate(learning_rate),
  )
