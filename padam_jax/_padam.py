"""Padam: partially adaptive momentum estimation (Chen et al., IJCAI 2020)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from padam_jax import _adam_like, _common
from padam_jax._common import ScalarOrSchedule


class ScaleByPartialAmsgradState(NamedTuple):
  """State of :func:`scale_by_partial_amsgrad`.

  Attributes:
    count: number of updates applied so far (int32).
    mu: first moment ``m_t`` (in ``mu_dtype`` when given).
    nu: raw second moment ``v_t``.
    nu_max: running elementwise maximum of the raw ``v_t`` (``vhat_t``).
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  nu_max: optax.Updates


def scale_by_partial_amsgrad(
  p: ScalarOrSchedule = 0.125,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  *,
  bias_correction: bool = True,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""Rescales updates by Padam's partially adaptive AMSGrad rule.

  With gradient :math:`g_t` at step :math:`t \ge 1`:

  .. math::

    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
    v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
    \hat v_t &= \max(\hat v_{t-1}, v_t) \\
    u_t &= c_t \, m_t / (\sqrt{\hat v_t} + \varepsilon)^{2p},
    \qquad c_t = \sqrt{1 - \beta_2^t} / (1 - \beta_1^t)

  Chained with ``optax.scale_by_learning_rate(lr)`` this is the authors'
  reference rule exactly: the maximum is taken over the *raw* second moment,
  ``eps`` is added to ``sqrt(vhat)`` *before* the power ``2p``, and the bias
  correction is Adam's whatever ``p`` is (for ``p < 1/2`` it acts as a warm-up
  of ``(1 - b2^t)^(1/2 - p)`` relative to a fully debiased step).

  With ``bias_correction=False`` and ``eps=0`` it is the paper's Algorithm 1,
  :math:`u_t = m_t / \hat v_t^p`; coordinates whose gradients have all been zero
  (``vhat = 0``, hence ``m = 0``) get a zero update instead of ``0/0``.

  Complex gradients get real second moments of ``|g|^2``, as in Optax.

  Differences from ``optax.amsgrad`` at ``p = 1/2``: optax takes the maximum of
  the *bias-corrected* second moment and applies the two bias corrections to
  ``m`` and ``v`` separately; here (as in PyTorch's ``Adam(amsgrad=True)``) the
  maximum is of the raw ``v`` and the corrections are one scalar factor.

  Args:
    p: partially adaptive exponent in ``[0, 1/2]``: ``1/2`` is AMSGrad, ``0`` is
      heavy-ball momentum with effective rate ``lr * (1 - b1)``. A number or a
      schedule (a callable of the step count, evaluated at the number of
      updates already applied, like Optax learning-rate schedules). A number
      is checked when the optimizer is built; a schedule's values are clipped
      into ``[0, 1/2]`` when used.
    b1: decay rate of the first moment, in ``[0, 1)``.
    b2: decay rate of the second moment, in ``[0, 1)``.
    eps: added to ``sqrt(vhat)`` before the power; ``>= 0``.
    bias_correction: whether to multiply by ``sqrt(1 - b2^t) / (1 - b1^t)``.
    mu_dtype: optional dtype of the first moment in the state (e.g.
      ``jnp.bfloat16``). The moments are then computed in float32 (or in the
      gradients' dtype if wider) and rounded stochastically into a dtype
      narrower than float32, so that the stored value is right in expectation.
    nu_dtype: optional dtype of the second moment ``v`` and of ``vhat`` in the
      state, handled as ``mu_dtype`` is. With ``b2 = 0.999``, ``v`` moves by
      0.1% of its gap per step, below bfloat16's resolution: rounded to
      nearest it would stop moving.

  Returns:
    An ``optax.GradientTransformation`` whose state is
    :class:`ScaleByPartialAmsgradState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import padam_jax
    >>> tx = optax.chain(padam_jax.scale_by_partial_amsgrad(p=0.125),
    ...                  optax.scale_by_learning_rate(0.1))
    >>> params = jnp.array([1.0, -2.0])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(2 * params, state)
    >>> print(" ".join(f"{x:.5f}" for x in optax.apply_updates(params, updates)))
    0.98739 -1.97879

  References:
    Chen, Zhou, Tang, Yang, Cao, Gu, `Closing the Generalization Gap of Adaptive
    Gradient Methods in Training Deep Neural Networks
    <https://arxiv.org/abs/1806.06763>`_, IJCAI 2020 (Algorithm 1).
  """
  return _adam_like.scale_by_partial_moments(
    _adam_like.ADAM,
    ScaleByPartialAmsgradState,
    p,
    b1,
    b2,
    eps,
    running_max=True,
    bias_correction=bias_correction,
    mu_dtype=mu_dtype,
    nu_dtype=nu_dtype,
  )


def padam(
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
  r"""Padam, the partially adaptive momentum estimation method.

  ``optax.chain(add_decayed_weights(weight_decay, mask),
  scale_by_partial_amsgrad(p, b1, b2, eps), scale_by_learning_rate(learning_rate))``:
  the authors' reference update

  .. math::

    x_{t+1} = x_t - \alpha_t \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
      \frac{m_t}{(\sqrt{\hat v_t} + \varepsilon)^{2p}}

  where the moments are of ``g_t + weight_decay * x_t``: weight decay is
  *coupled* (L2 added to the gradient, as in the reference code), so it is
  also rescaled by the adaptive denominator. See
  :func:`scale_by_partial_amsgrad` for the conventions.

  Args:
    learning_rate: base step size ``alpha_t``, a number or an Optax schedule.
      The paper uses 0.1 for CIFAR with the same step decays as SGD-momentum.
    p: partially adaptive exponent in ``[0, 1/2]`` (a number or a schedule);
      1/8 in the paper's image experiments.
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: added to ``sqrt(vhat)`` before the power ``2p``.
    weight_decay: coupled L2 weight decay, ``>= 0`` (5e-4 in the paper's CIFAR runs).
    mask: which parameters weight decay applies to, as in ``optax.adamw``: a
      pytree of bools with the parameters' structure, or a callable returning one.
      ``update`` needs ``params`` only when ``weight_decay`` is not 0.
    bias_correction: Adam's bias correction (on, as in the reference code).
    mu_dtype: optional dtype of the first moment in the state (rounded
      stochastically when narrower than float32).
    nu_dtype: optional dtype of ``v`` and ``vhat`` in the state (rounded
      stochastically when narrower than float32).

  Returns:
    The optimizer, an ``optax.GradientTransformation``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import padam_jax
    >>> def f(x):
    ...   return jnp.sum(x ** 2)
    >>> tx = padam_jax.padam(learning_rate=0.1, p=0.125)
    >>> params = jnp.array([1.0, 2.0, 3.0])
    >>> state = tx.init(params)
    >>> for _ in range(200):
    ...   grads = jax.grad(f)(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{f(params):.2e}")
    1.81e-08

  References:
    Chen, Zhou, Tang, Yang, Cao, Gu, `Closing the Generalization Gap of Adaptive
    Gradient Methods in Training Deep Neural Networks
    <https://arxiv.org/abs/1806.06763>`_, IJCAI 2020.
  """
  return _common.coupled_l2(
    scale_by_partial_amsgrad(
      p, b1, b2, eps, bias_correction=bias_correction, mu_dtype=mu_dtype, nu_dtype=nu_dtype
    ),
    learning_rate,
    weight_decay,
    mask,
  )
