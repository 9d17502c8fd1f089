"""PadamW: Padam with decoupled weight decay, as AdamW is to Adam."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from padam_jax import _common, _padam, _validation
from padam_jax._common import ScalarOrSchedule


def padamw(
  learning_rate: ScalarOrSchedule = 0.1,
  p: ScalarOrSchedule = 0.125,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  weight_decay: ScalarOrSchedule = 1e-4,
  *,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  bias_correction: bool = True,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""Padam with decoupled, learning-rate-scaled weight decay.

  ``optax.chain(scale_by_partial_amsgrad(p, b1, b2, eps),
  add_decayed_weights(weight_decay, mask), scale_by_learning_rate(learning_rate))``,
  the structure of ``optax.adamw``:

  .. math::

    x_{t+1} = x_t - \alpha_t \left( \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
      \frac{m_t}{(\sqrt{\hat v_t} + \varepsilon)^{2p}} + \lambda x_t \right)

  The moments see the raw gradient; the decay ``lambda * x`` is not rescaled by
  the adaptive denominator (with :func:`padam_jax.padam`'s coupled decay it is).
  At ``p = 1/2`` this is PyTorch's ``AdamW(amsgrad=True)``; at ``weight_decay=0``
  it is :func:`padam_jax.padam`.

  Args:
    learning_rate: step size ``alpha_t``, a number or an Optax schedule.
    p: partially adaptive exponent in ``[0, 1/2]`` (a number or a schedule).
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: added to ``sqrt(vhat)`` before the power.
    weight_decay: decoupled decay rate ``lambda >= 0`` (multiplied by the learning
      rate, as in ``optax.adamw``), a number or a schedule.
    mask: which parameters weight decay applies to, as in ``optax.adamw``.
    bias_correction: Adam's bias correction.
    mu_dtype: optional dtype of the first moment in the state (rounded
      stochastically when narrower than float32).
    nu_dtype: optional dtype of ``v`` and ``vhat`` in the state (rounded
      stochastically when narrower than float32).

  Returns:
    The optimizer, an ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import padam_jax
    >>> tx = padam_jax.padamw(learning_rate=0.1, p=0.125, weight_decay=0.5)
    >>> params = jnp.array([1.0, -2.0])
    >>> updates, _ = tx.update(jnp.zeros(2), tx.init(params), params)
    >>> print(updates)  # zero gradient: only the decay, -lr * lambda * x
    [-0.05  0.1 ]

  References:
    Chen, Zhou, Tang, Yang, Cao, Gu, `Closing the Generalization Gap of Adaptive
    Gradient Methods in Training Deep Neural Networks
    <https://arxiv.org/abs/1806.06763>`_, IJCAI 2020.

    Loshchilov, Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.
  """
  _validation.check_interval("weight_decay", weight_decay, 0.0)
  return optax.chain(
    _padam.scale_by_partial_amsgrad(
      p, b1, b2, eps, bias_correction=bias_correction, mu_dtype=mu_dtype, nu_dtype=nu_dtype
    ),
    _common.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate),
  )
