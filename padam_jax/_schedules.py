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
  authors expected could help but did not try. Since the adaptive denominator
  ``(sqrt(vhat) + eps)^(2p)`` changes scale with ``p``, a fixed learning rate
  means a changing effective step: pick the learning rate for ``end_p`` (the
  value training ends with) and keep the rule's bias-correction warm-up.

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
    >>> tx = padam_jax.padam(learning_rate=0.1, p=p)
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
