"""AdaBound and AMSBound: Adam with per-coordinate steps clipped into converging bounds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from padam_jax import _adam_like, _common, _validation
from padam_jax._common import ScalarOrSchedule


class ScaleByAdaboundState(NamedTuple):
  """State of :func:`scale_by_adabound`.

  Attributes:
    count: number of updates applied so far (int32).
    mu: first moment ``m_t`` (in ``mu_dtype`` when given).
    nu: second moment ``v_t``.
    nu_max: running maximum of the raw ``v_t`` (AMSBound), ``None`` for AdaBound.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  nu_max: optax.Updates | None = None


def scale_by_adabound(
  learning_rate: ScalarOrSchedule = 1e-3,
  final_lr: jax.typing.ArrayLike = 0.1,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  gamma: jax.typing.ArrayLike = 1e-3,
  *,
  amsbound: bool = False,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""Rescales updates by AdaBound's clipped per-coordinate step (learning rate included).

  At step :math:`t \ge 1`, with :math:`\alpha_t` the learning rate and
  :math:`\alpha_0` its value at step 0:

  .. math::

    \eta_t &= \alpha_t \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
      \frac{1}{\sqrt{v_t} + \varepsilon} \\
    f_t &= \text{final\_lr} \cdot \alpha_t / \alpha_0 \\
    u_t &= \operatorname{clip}\!\left(\eta_t,\;
      f_t \left(1 - \frac{1}{\gamma t + 1}\right),\;
      f_t \left(1 + \frac{1}{\gamma t}\right)\right) m_t

  with Adam's moments; AMSBound uses the running maximum of the raw ``v_t``.
  The bounds start at ``[0, inf)`` (Adam) and close on ``f_t`` (SGD with
  momentum). The step already includes the learning rate because the clip acts
  on it, so the result is the positive step size times ``m``: chain
  ``optax.scale(-1.0)`` after it (as :func:`adabound` does). A learning-rate
  schedule moves the bounds with it through ``alpha_t / alpha_0``. Under
  ``optax.inject_hyperparams`` a scheduled learning rate reaches this function
  as the current number only, so ``alpha_t / alpha_0`` is 1: pass the schedule
  itself (as the registry in ``examples/`` does) for bounds that follow it.

  Args:
    learning_rate: ``alpha_t``, a number or a schedule (evaluated at the number
      of updates already applied); its value at step 0 must not be zero.
    final_lr: the SGD step size the bounds converge to (at ``alpha_t = alpha_0``).
    b1: decay rate of the first moment, in ``[0, 1)``.
    b2: decay rate of the second moment, in ``[0, 1)``.
    eps: added to ``sqrt(v)``; ``>= 0``.
    gamma: convergence speed of the bounds, ``> 0``.
    amsbound: whether to use the running maximum of ``v`` (AMSBound).
    mu_dtype: optional dtype of the first moment in the state (rounded
      stochastically when narrower than float32).
    nu_dtype: optional dtype of ``v`` (and AMSBound's ``vhat``) in the state (rounded
      stochastically when narrower than float32).

  Returns:
    An ``optax.GradientTransformation`` whose state is :class:`ScaleByAdaboundState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import padam_jax
    >>> tx = padam_jax.scale_by_adabound(learning_rate=1.0, final_lr=0.1, gamma=0.5)
    >>> updates, _ = tx.update(jnp.array([1e-3, 1.0]), tx.init(jnp.zeros(2)))
    >>> # Adam's first step size is 10 / |g|, above the upper bound 0.1 * (1 + 1/0.5):
    >>> # both coordinates move by 0.3 * m = 0.3 * 0.1 * g.
    >>> print([f"{u:.3g}" for u in updates])
    ['3e-05', '0.03']

  References:
    Luo, Xiong, Liu, Sun, `Adaptive Gradient Methods with Dynamic Bound of
    Learning Rate <https://openreview.net/forum?id=Bkg3g2R9FX>`_, ICLR 2019.
  """
  _validation.check_betas(b1, b2)
  _validation.check_interval("eps", eps, 0.0)
  _validation.check_interval("final_lr", final_lr, 0.0)
  _validation.check_interval("gamma", gamma, 0.0, low_open=True)
  _validation.check_interval(
    "learning_rate",
    learning_rate,
    0.0,
    low_open=True,
    description="the bounds are scaled by learning_rate / its initial value",
  )
  mu_dtype = _validation.state_dtype("mu_dtype", mu_dtype, real=False)
  nu_dtype = _validation.state_dtype("nu_dtype", nu_dtype)

  def init_fn(params: optax.Params) -> ScaleByAdaboundState:
    return ScaleByAdaboundState(
      count=jnp.zeros([], jnp.int32),
      **_adam_like.init_moments(params, mu_dtype, nu_dtype, running_max=amsbound),
    )

  def update_fn(
    updates: optax.Updates,
    state: ScaleByAdaboundState,
    params: optax.Params | None = None,
  ) -> tuple[optax.Updates, ScaleByAdaboundState]:
    del params
    count_inc = optax.safe_increment(state.count)
    t = count_inc.astype(jnp.float32)
    lr = jnp.asarray(_common.evaluate(learning_rate, state.count), jnp.float32)
    lr0 = jnp.asarray(_common.evaluate(learning_rate, jnp.zeros([], jnp.int32)), jnp.float32)
    final = jnp.asarray(final_lr, jnp.float32) * lr / lr0
    g_t = jnp.asarray(gamma, jnp.float32) * t
    lower = final * (1.0 - 1.0 / (g_t + 1.0))
    upper = final * (1.0 + 1.0 / g_t)
    step_size = lr * _common.bias_correction_factor(b1, b2, count_inc)

    moments, denominators = _adam_like.update_moments(
      _adam_like.ADAM,
      b1,
      b2,
      eps,
      updates,
      state,
      running_max=amsbound,
      wide_mu=mu_dtype is not None,
      wide_nu=nu_dtype is not None,
    )

    def step(m, v):
      dtype = v.dtype  # real; m may be complex
      # sqrt(v) + eps may be 0 (eps = 0, no gradient yet): inf clips to the
      # finite upper bound and multiplies m = 0, so no guard is needed.
      eta = step_size.astype(dtype) / _adam_like.ADAM.denominator(eps, v)
      return jnp.clip(eta, lower.astype(dtype), upper.astype(dtype)).astype(m.dtype) * m

    steps = jax.tree.map(step, moments["mu"], denominators)
    if mu_dtype is not None:  # the moments were float32: the step in the gradients' dtype
      steps = _common.in_float_dtype_of(steps, updates)
    moments = _adam_like.cast_moments(moments, state, count_inc)
    return steps, ScaleByAdaboundState(count=count_inc, **moments)

  return optax.GradientTransformation(init_fn, update_fn)


def adabound(
  learning_rate: ScalarOrSchedule = 1e-3,
  final_lr: jax.typing.ArrayLike = 0.1,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  gamma: jax.typing.ArrayLike = 1e-3,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  amsbound: bool = False,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""AdaBound (Luo et al., 2019), as in the authors' reference code.

  ``optax.chain(add_decayed_weights(weight_decay, mask),
  scale_by_adabound(learning_rate, final_lr, b1, b2, eps, gamma), scale(-1))``:

  .. math::

    x_{t+1} = x_t - \operatorname{clip}\!\left(
      \frac{\alpha_t \sqrt{1-\beta_2^t}/(1-\beta_1^t)}{\sqrt{v_t} + \varepsilon},
      \eta_l(t), \eta_u(t)\right) m_t

  with coupled L2 weight decay (added to the gradient) and bounds
  ``eta_l = f_t (1 - 1/(gamma t + 1))``, ``eta_u = f_t (1 + 1/(gamma t))``,
  ``f_t = final_lr * alpha_t / alpha_0``. See :func:`scale_by_adabound`.

  Args:
    learning_rate: Adam's step size ``alpha_t``, a number or an Optax schedule.
    final_lr: the SGD step size the bounds converge to.
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: added to ``sqrt(v)``.
    gamma: convergence speed of the bounds.
    weight_decay: coupled L2 weight decay, ``>= 0``.
    mask: which parameters weight decay applies to, as in ``optax.adamw``.
    amsbound: whether to use the running maximum of ``v`` (see :func:`amsbound`).
    mu_dtype: optional dtype of the first moment in the state (rounded
      stochastically when narrower than float32).
    nu_dtype: optional dtype of ``v`` (and AMSBound's ``vhat``) in the state (rounded
      stochastically when narrower than float32).

  Returns:
    The optimizer, an ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import padam_jax
    >>> tx = padam_jax.adabound(learning_rate=1e-2, final_lr=0.1)
    >>> params = jnp.array([1.0, 2.0, 3.0])
    >>> state = tx.init(params)
    >>> for _ in range(300):
    ...   updates, state = tx.update(2 * params, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{jnp.sum(params ** 2):.2e}")
    2.25e-10

  References:
    Luo, Xiong, Liu, Sun, `Adaptive Gradient Methods with Dynamic Bound of
    Learning Rate <https://openreview.net/forum?id=Bkg3g2R9FX>`_, ICLR 2019.
  """
  _validation.check_interval("weight_decay", weight_decay, 0.0)
  return optax.chain(
    _common.add_decayed_weights(weight_decay, mask),
    scale_by_adabound(
      learning_rate,
      final_lr,
      b1,
      b2,
      eps,
      gamma,
      amsbound=amsbound,
      mu_dtype=mu_dtype,
      nu_dtype=nu_dtype,
    ),
    optax.scale(-1.0),
  )


def amsbound(
  learning_rate: ScalarOrSchedule = 1e-3,
  final_lr: jax.typing.ArrayLike = 0.1,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  gamma: jax.typing.ArrayLike = 1e-3,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""AMSBound: :func:`adabound` with the running maximum of the raw second moment.

  The step is ``clip(alpha_t c_t / (sqrt(vhat_t) + eps), eta_l(t), eta_u(t)) m_t``
  with ``vhat_t = max(vhat_{t-1}, v_t)``, as in the authors' reference code. Its
  arguments are :func:`adabound`'s, the same names and meanings (``eps`` is added to
  ``sqrt(vhat)``), without ``amsbound``, which is always on here.

  Returns:
    The optimizer, an ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import padam_jax
    >>> tx = padam_jax.amsbound(learning_rate=1e-3)
    >>> params = jnp.ones(2)
    >>> updates, _ = tx.update(jnp.array([0.5, -0.5]), tx.init(params), params)
    >>> print(updates.round(6))  # first step: Adam's -lr * sign(g), inside the bounds
    [-0.001  0.001]

  References:
    Luo, Xiong, Liu, Sun, `Adaptive Gradient Methods with Dynamic Bound of
    Learning Rate <https://openreview.net/forum?id=Bkg3g2R9FX>`_, ICLR 2019.
  """
  return adabound(
    learning_rate,
    final_lr,
    b1,
    b2,
    eps,
    gamma,
    weight_decay,
    mask=mask,
    amsbound=True,
    mu_dtype=mu_dtype,
    nu_dtype=nu_dtype,
  )
