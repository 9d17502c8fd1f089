"""Small pieces shared by the partially adaptive rules: moments and the guarded power."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from padam_jax import _padam, _power


def ema(decay: jax.typing.ArrayLike, g: jax.Array, old: jax.Array, order: int) -> jax.Array:
  """``decay * old + (1 - decay) * g**order`` in the gradient's float dtype."""
  dtype = _padam.float_dtype(g.dtype)
  g = g.astype(dtype)
  # 1 - decay before rounding to float32, as in Padam: 1 - float32(0.999) is off by 1e-5.
  weight = jnp.asarray(1 - decay, dtype)
  return jnp.asarray(decay, dtype) * old.astype(dtype) + weight * (g if order == 1 else g * g)


def partial_divide(
    numerator: jax.Array,
    denominator: jax.Array,
    two_p: jax.typing.ArrayLike,
    *,
    guard_zero: bool,
) -> jax.Array:
  """``numerator / denominator ** two_p`` through :func:`padam_jax._power.inverse_power`.

  With ``guard_zero`` a zero denominator gives a zero result: the rules only
  meet ``0 ** -q`` where every gradient so far was zero, so the numerator is
  zero as well and ``0 / 0`` means "no step".
  """
  out = numerator * _power.inverse_power(denominator, two_p)
  if guard_zero:
    out = jnp.where(denominator == 0, jnp.zeros_like(out), out)
  return out
