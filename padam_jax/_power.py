"""The partial power ``x ** (-q)`` at the heart of every partially adaptive rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def inverse_power(x: jax.Array, q: jax.typing.ArrayLike) -> jax.Array:
  """Returns ``x ** -q`` elementwise for ``x >= 0`` and ``0 <= q <= 1``.

  ``x ** -0`` is 1 (also at ``x = 0``) and ``0 ** -q`` is ``inf`` for ``q > 0``;
  callers that allow ``x = 0`` guard the product themselves.
  """
  return jnp.power(x, -jnp.asarray(q, x.dtype))
