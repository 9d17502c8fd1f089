"""Partial AdaMax: AdaMax with the infinity-norm moment to a partial power."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from padam_jax import _adam_like, _common
from padam_jax._common import ScalarOrSchedule


class ScaleByPartialAdamaxState(NamedTuple):
  """State of :func:`scale_by_partial_adamax`.

  Attributes:
    count: number of updates applied so far (int32).
    mu: first moment ``m_t`` (in ``mu_dtype`` when given).
    nu: exponentially weighted infinity norm ``u_t``.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_partial_adamax(
  p: ScalarOrSchedule = 0.125,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  *,
  bias_correction: bool = True,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""Rescales updates by AdaMax's rule with the infinity norm to a partial power.

  .. math::

    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
    u_t &= \max(\beta_2 u_{t-1}, |g_t| + \varepsilon) \\
    s_t &= \frac{m_t}{1 - \beta_1^t} \, / \, u_t^{2p}

  ``u_t`` already plays the part of ``sqrt(v)`` (it has the units of ``g``), so
  it is raised to ``2p`` as ``sqrt(v)`` is in Padam; ``eps`` enters inside the
  maximum, where AdaMax (Kingma & Ba, PyTorch and Optax) puts it. The bias
  correction is AdaMax's, of the first moment only. At ``p = 1/2`` this is
  ``optax.scale_by_adamax``; at ``p = 0`` it is the bias-corrected moving
  average ``m_t / (1 - b1^t)``.

  Args:
    p: partially adaptive exponent in ``[0, 1/2]``, a number or a schedule.
    b1: decay rate of the first moment, in ``[0, 1)``.
    b2: decay rate of the infinity norm, in ``[0, 1)``.
    eps: added to ``|g|`` inside the maximum; ``>= 0``.
    bias_correction: whether to divide by ``1 - b1^t``.
    mu_dtype: optional dtype of the first moment in the state (rounded
      stochastically when narrower than float32).
    nu_dtype: optional dtype of the infinity norm ``u`` in the state (rounded
      stochastically when narrower than float32).

  Returns:
    An ``optax.GradientTransformation`` whose state is
    :class:`ScaleByPartialAdamaxState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import padam_jax
    >>> tx = padam_jax.scale_by_partial_adamax(p=0.25, eps=0.0)
    >>> updates, _ = tx.update(jnp.array([4.0, 0.0]), tx.init(jnp.zeros(2)))
    >>> print(updates.round(4))  # 4 / 4 ** 0.5
    [2. 0.]

  References:
    Kingma, Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, ICLR 2015 (Section 7.1, AdaMax).

    Chen, Zhou, Tang, Yang, Cao, Gu, `Closing the Generalization Gap of Adaptive
    Gradient Methods in Training Deep Neural Networks
    <https://arxiv.org/abs/1806.06763>`_, IJCAI 2020 (Section 3).
  """
  return _adam_like.scale_by_partial_moments(
    _adam_like.ADAMAX,
    ScaleByPartialAdamaxState,
    p,
    b1,
    b2,
    eps,
    running_max=False,
    bias_correction=bias_correction,
    mu_dtype=mu_dtype,
    nu_dtype=nu_dtype,
  )


def partial_adamax(
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
  r"""Partially adaptive AdaMax.

  ``optax.chain(add_decayed_weights(weight_decay, mask),
  scale_by_partial_adamax(p, b1, b2, eps), scale_by_learning_rate(learning_rate))``:

  .. math::

    x_{t+1} = x_t - \frac{\alpha_t}{1 - \beta_1^t} \frac{m_t}{u_t^{2p}}

  AdaMax at ``p = 1/2``; at ``p = 0`` heavy-ball momentum with effective rate
  ``lr * (1 - b1)`` (debiased). Weight decay is coupled L2.

  Args:
    learning_rate: step size, a number or an Optax schedule.
    p: partially adaptive exponent in ``[0, 1/2]`` (a number or a schedule).
    b1: decay rate of the first moment.
    b2: decay rate of the infinity norm.
    eps: added to ``|g|`` inside the maximum.
    weight_decay: coupled L2 weight decay, ``>= 0``.
    mask: which parameters weight decay applies to, as in ``optax.adamw``.
    bias_correction: AdaMax's bias correction of the first moment.
    mu_dtype: optional dtype of the first moment in the state (rounded
      stochastically when narrower than float32).
    nu_dtype: optional dtype of the infinity norm ``u`` in the state (rounded
      stochastically when narrower than float32).

  Returns:
    The optimizer, an ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import padam_jax
    >>> tx = padam_jax.partial_adamax(learning_rate=0.1, p=0.125)
    >>> params = jnp.array([1.0, 2.0, 3.0])
    >>> state = tx.init(params)
    >>> for _ in range(200):
    ...   updates, state = tx.update(2 * params, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{jnp.sum(params ** 2):.2e}")
    2.27e-09

  References:
    Kingma, Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, ICLR 2015 (Section 7.1, AdaMax).
  """
  return _common.coupled_l2(
    scale_by_partial_adamax(
      p, b1, b2, eps, bias_correction=bias_correction, mu_dtype=mu_dtype, nu_dtype=nu_dtype
    ),
    learning_rate,
    weight_decay,
    mask,
  )
