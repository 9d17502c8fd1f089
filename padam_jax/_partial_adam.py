"""Partial Adam: Adam with the adaptive denominator raised to a partial power."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from padam_jax import _adam_like, _common
from padam_jax._common import ScalarOrSchedule


class ScaleByPartialAdamState(NamedTuple):
  """State of :func:`scale_by_partial_adam`.

  Attributes:
    count: number of updates applied so far (int32).
    mu: first moment ``m_t`` (in ``mu_dtype`` when given).
    nu: second moment ``v_t``.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_partial_adam(
  p: ScalarOrSchedule = 0.125,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  *,
  bias_correction: bool = True,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""Rescales updates by Adam's rule with the denominator to a partial power.

  Padam without the running maximum:

  .. math::

    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
    v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
    u_t &= c_t \, m_t / (\sqrt{v_t} + \varepsilon)^{2p},
    \qquad c_t = \sqrt{1 - \beta_2^t} / (1 - \beta_1^t)

  with the conventions of :func:`padam_jax.scale_by_partial_amsgrad`: ``eps``
  is added to ``sqrt(v)`` before the power, and the bias correction is Adam's
  single factor whatever ``p`` is. At ``p = 1/2`` and ``eps = 0`` this is
  ``optax.scale_by_adam(eps=0)``; with ``eps > 0`` it is PyTorch's form of Adam
  (``eps`` added to the raw ``sqrt(v)``). At ``p = 0`` it is
  ``c_t m_t``, heavy-ball momentum with effective rate ``lr * (1 - b1)``.

  Args:
    p: partially adaptive exponent in ``[0, 1/2]``, a number or a schedule.
    b1: decay rate of the first moment, in ``[0, 1)``.
    b2: decay rate of the second moment, in ``[0, 1)``.
    eps: added to ``sqrt(v)`` before the power; ``>= 0``.
    bias_correction: whether to multiply by ``sqrt(1 - b2^t) / (1 - b1^t)``.
    mu_dtype: optional dtype of the first moment in the state (rounded
      stochastically when narrower than float32).
    nu_dtype: optional dtype of the second moment ``v`` in the state (rounded
      stochastically when narrower than float32).

  Returns:
    An ``optax.GradientTransformation`` whose state is
    :class:`ScaleByPartialAdamState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import padam_jax
    >>> tx = padam_jax.scale_by_partial_adam(p=0.125)
    >>> state = tx.init(jnp.zeros(2))
    >>> updates, state = tx.update(jnp.array([1.0, -4.0]), state)
    >>> print(updates.round(4))  # c_1 * 0.1 * g / (sqrt(0.001) * |g|) ** (1/4)
    [ 0.075  -0.2121]

  References:
    Chen, Zhou, Tang, Yang, Cao, Gu, `Closing the Generalization Gap of Adaptive
    Gradient Methods in Training Deep Neural Networks
    <https://arxiv.org/abs/1806.06763>`_, IJCAI 2020 (Section 3).
  """
  return _adam_like.scale_by_partial_moments(
    _adam_like.ADAM,
    ScaleByPartialAdamState,
    p,
    b1,
    b2,
    eps,
    running_max=False,
    bias_correction=bias_correction,
    mu_dtype=mu_dtype,
    nu_dtype=nu_dtype,
  )


def partial_adam(
  learning_rate: ScalarOrSchedule = 0.1,
  p: ScalarOrSchedule = 0.125,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  bias_correction: bool = True,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""Partially adaptive Adam: Padam without the AMSGrad maximum.

  ``optax.chain(add_decayed_weights(weight_decay, mask),
  scale_by_partial_adam(p, b1, b2, eps), scale_by_learning_rate(learning_rate))``:

  .. math::

    x_{t+1} = x_t - \alpha_t \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
      \frac{m_t}{(\sqrt{v_t} + \varepsilon)^{2p}}

  with weight decay coupled (added to the gradient) as in :func:`padam_jax.padam`.

  Args:
    learning_rate: step size, a number or an Optax schedule.
    p: partially adaptive exponent in ``[0, 1/2]`` (a number or a schedule).
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: added to ``sqrt(v)`` before the power.
    weight_decay: coupled L2 weight decay, ``>= 0``.
    mask: which parameters weight decay applies to, as in ``optax.adamw``.
    bias_correction: Adam's bias correction.
    mu_dtype: optional dtype of the first moment in the state (rounded
      stochastically when narrower than float32).
    nu_dtype: optional dtype of the second moment ``v`` in the state (rounded
      stochastically when narrower than float32).

  Returns:
    The optimizer, an ``optax.GradientTransformation``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import padam_jax
    >>> tx = padam_jax.partial_adam(learning_rate=0.1, p=0.125)
    >>> params = jnp.array([1.0, 2.0, 3.0])
    >>> state = tx.init(params)
    >>> for _ in range(200):
    ...   updates, state = tx.update(2 * params, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{jnp.sum(params ** 2):.2e}")
    2.01e-08

  References:
    Chen, Zhou, Tang, Yang, Cao, Gu, `Closing the Generalization Gap of Adaptive
    Gradient Methods in Training Deep Neural Networks
    <https://arxiv.org/abs/1806.06763>`_, IJCAI 2020.
  """
  return _common.coupled_l2(
    scale_by_partial_adam(
      p, b1, b2, eps, bias_correction=bias_correction, mu_dtype=mu_dtype, nu_dtype=nu_dtype
    ),
    learning_rate,
    weight_decay,
    mask,
  )
