"""Schedules for the partially adaptive exponent ``p``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from padam_jax import _validation


def anneal_p(
  transition_steps: int,
  init_p: float = 0.5,
  end_p: float = 0.125,
  *,
  transition_begin: int = 0,
  shape: str = "cosine",
) -> optax.Schedule:
  r"""A schedule for ``p`` that moves from adaptive (``init_p``) to SGD-like (``end_p``).

  Pass it as ``p`` to :func:`padam_jax.padam` (or to any rule of the partially
  adaptive family): ``p`` stays at ``init_p`` for ``transition_begin`` steps,
  moves to ``end_p`` over ``transition_steps`` steps, then stays there. With
  :math:`s = \min(1, \max(0, (t - \text{begin}) / \text{steps}))`:

  .. math::

    p_t = p_\text{end} + (p_\text{init} - p_\text{end}) \cdot
      \begin{cases} \tfrac12 (1 + \cos \pi s) & \text{cosine} \\
                    1 - s & \text{linear} \end{cases}

  The default, 1/2 to 1/8, starts as AMSGrad (fast early progress) and ends at
  the paper's ``p = 1/8`` (SGD-like generalization), the annealing the paper's
  authors expected could help but did not try.

  The learning rate has to move with ``p``: the step
  ``lr / (sqrt(vhat) + eps)^(2p)`` grows with ``p`` wherever ``sqrt(vhat) < 1``
  (a coordinate with ``sqrt(vhat) = 1e-3`` gets 1000x at ``p = 1/2`` and 5.6x at
  ``p = 1/8``), so Padam's rate 0.1 at ``p = 1/2`` is AMSGrad at 0.1. The second
  example starts at Adam's rate 1e-3 and rises log-linearly to Padam's 0.1 while
  ``p`` falls linearly, which keeps that coordinate's multiplier
  ``lr / sqrt(vhat)^(2p)`` between 0.56 and 1 throughout.

  Args:
    transition_steps: number of steps over which ``p`` moves, ``> 0``.
    init_p: ``p`` at the start, in ``[0, 1/2]``.
    end_p: ``p`` at the end, in ``[0, 1/2]``.
    transition_begin: number of steps ``p`` stays at ``init_p`` first, ``>= 0``.
    shape: ``"cosine"`` (slow at both ends) or ``"linear"``.

  Returns:
    An ``optax.Schedule``: step count -> ``p`` (float32).

  Examples:
    >>> import optax
    >>> import padam_jax
    >>> p = padam_jax.anneal_p(transition_steps=1000, init_p=0.5, end_p=0.125)
    >>> print([round(float(p(t)), 4) for t in (0, 500, 1000, 5000)])
    [0.5, 0.3125, 0.125, 0.125]

    The recipe for a run of ``T`` steps with the paper's step decays:

    >>> T = 391 * 200
    >>> ramp = T // 4  # the adaptive phase
    >>> p = padam_jax.anneal_p(ramp, init_p=0.5, end_p=0.125, shape="linear")
    >>> rise = optax.exponential_decay(1e-3, ramp, decay_rate=100.0, end_value=0.1)
    >>> decay = optax.piecewise_constant_schedule(1.0, {T // 2: 0.1, 3 * T // 4: 0.1})
    >>> lr = lambda t: rise(t) * decay(t)
    >>> tx = padam_jax.padam(learning_rate=lr, p=p, weight_decay=5e-4)
    >>> for t in (0, ramp // 2, ramp, T // 2, T - 1):
    ...   print(f"step {t:>5}: p = {float(p(t)):.4f}, lr = {float(lr(t)):.2e}")
    step     0: p = 0.5000, lr = 1.00e-03
    step  9775: p = 0.3125, lr = 1.00e-02
    step 19550: p = 0.1250, lr = 1.00e-01
    step 39100: p = 0.1250, lr = 1.00e-02
    step 78199: p = 0.1250, lr = 1.00e-03
  """
  _validation.check_partial_power(init_p)
  _validation.check_partial_power(end_p)
  if not isinstance(transition_steps, int) or transition_steps <= 0:
    raise ValueError(f"transition_steps must be a positive int, got {transition_steps!r}")
  if not isinstance(transition_begin, int) or transition_begin < 0:
    raise ValueError(f"transition_begin must be a non-negative int, got {transition_begin!r}")
  if shape not in ("cosine", "linear"):
    raise ValueError(f"shape must be 'cosine' or 'linear', got {shape!r}")
  init_p, end_p = float(init_p), float(end_p)

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    t = jnp.asarray(count, jnp.float32)
    s = jnp.clip((t - transition_begin) / transition_steps, 0.0, 1.0)
    weight = 0.5 * (1.0 + jnp.cos(math.pi * s)) if shape == "cosine" else 1.0 - s
    return end_p + (init_p - end_p) * weight

  return schedule
