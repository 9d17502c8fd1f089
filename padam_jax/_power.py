"""The partial power ``x ** (-q)`` at the heart of every partially adaptive rule.

A partially adaptive step divides by ``denominator ** q`` with ``q = 2p`` a
fraction such as 1/4. A plain ``jnp.power`` costs far more than the rest of the
optimizer step on CPUs (XLA:CPU evaluates it without vectorised polynomials),
so when ``q`` is a Python number the cheapest exact form is chosen while
tracing:

- ``q = 0``: ones.
- ``q = k / 2**n`` with ``n <= MAX_SQRT_DEPTH`` (``p`` = 1/2, 1/4, 1/8, 1/16,
  3/8, ...): a chain of square roots, ``x ** (1/2**j)`` for each set bit ``j``
  of ``q``, multiplied together and inverted. Square root and division are
  correctly rounded, so the result is within a few ulp.
- any other ``q`` in ``(0, 1]`` (``p`` = 1/5, 2/5, ...), float32 and narrower:
  ``exp`` and ``log`` after an exact range reduction, ``x = m * 2**e`` with
  ``m`` near 1. A bare ``exp(-q * log(x))`` would lose ``log2(|q log x|)`` bits
  (tens of ulp at ``x = 1e-30``); splitting ``-q * e`` exactly into an integer
  and a fraction keeps every factor accurate to a few ulp.
- a traced ``q`` (a schedule's value, ``optax.inject_hyperparams``), other
  dtypes, or ``q`` outside ``[0, 1]``: ``jnp.power``.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

# Deepest chain of square roots used for ``q = k / 2**n``. Each level costs
# one square root; beyond four levels (p = 1/32) the reduced exp/log form is
# as cheap on CPUs and the chain's rounding errors start to add up.
MAX_SQRT_DEPTH = 4

# ``q`` is split as ``q_hi + q_lo`` with ``q_hi`` on this many bits, so that
# ``q_hi * e`` is exact in float32 for any float32 exponent ``|e| <= 2**8``.
_Q_HI_BITS = 12

_REDUCED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def static_exponent(q: object) -> float | None:
  """Returns ``q`` as a Python float when it is a plain number known while tracing.

  Only Python and NumPy scalars count: a ``jax.Array`` (traced or not) takes the
  general path, so a schedule's value never forces a device-to-host copy.
  """
  if isinstance(q, bool) or not isinstance(q, numbers.Real):
    return None
  value = float(q)
  return value if math.isfinite(value) else None


def dyadic_bits(q: float, max_depth: int = MAX_SQRT_DEPTH) -> tuple[int, ...] | None:
  """The ``j`` with ``q = sum(2 ** -j)`` when ``q`` in ``(0, 1]`` is ``k / 2**n``, ``n <= max_depth``.

  >>> dyadic_bits(0.75)
  (1, 2)
  >>> dyadic_bits(1.0)
  (0,)
  >>> print(dyadic_bits(0.4))
  None
  """
  if not 0.0 < q <= 1.0:
    return None
  for depth in range(max_depth + 1):
    scaled = q * 2**depth  # exact: scaling by a power of two
    if scaled == int(scaled):
      k = int(scaled)
      return tuple(depth - bit for bit in reversed(range(depth + 1)) if k >> bit & 1)
  return None


def _sqrt_chain(x: jax.Array, bits: tuple[int, ...]) -> jax.Array:
  """``1 / prod_j x ** (2 ** -j)``: ``0 -> inf`` and ``inf -> 0`` as the power does."""
  root = x
  product = None
  for depth in range(bits[-1] + 1):
    if depth:
      root = jnp.sqrt(root)
    if depth in bits:
      product = root if product is None else product * root
  return 1 / product


def _power_of_two(n: jax.Array) -> jax.Array:
  """``2.0 ** n`` in float32, exact, for integer ``n`` in ``[-126, 127]``."""
  biased = (n + 127).astype(jnp.int32) << 23
  return jax.lax.bitcast_convert_type(biased, jnp.float32)


def _reduced_exp_log(x: jax.Array, q: float) -> jax.Array:
  """``x ** -q`` in float32 through ``exp``/``log`` after an exact range reduction."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  mantissa, exponent = jnp.frexp(x)  # x = mantissa * 2**exponent, mantissa in [1/2, 1)
  low = mantissa < np.float32(math.sqrt(0.5))  # move mantissa into [sqrt(1/2), sqrt(2))
  mantissa = jnp.where(low, 2 * mantissa, mantissa)
  e = (exponent - low.astype(jnp.int32)).astype(jnp.float32)
  # -q * e = n + f exactly: q_hi * e has at most 12 + 9 significant bits.
  q_hi = math.ldexp(round(math.ldexp(q, _Q_HI_BITS)), -_Q_HI_BITS)
  q_lo = q - q_hi
  t = np.float32(-q_hi) * e
  n = jnp.round(t)
  f = (t - n) - np.float32(q_lo) * e
  y = jnp.exp(f * np.float32(math.log(2)) - np.float32(q) * jnp.log(mantissa))
  # |n| <= 150: two exact factors of 2**(n/2) keep both in the normal range.
  n = n.astype(jnp.int32)
  half = n >> 1
  return (y * _power_of_two(half) * _power_of_two(n - half)).astype(dtype)


def inverse_power(x: jax.Array, q: jax.typing.ArrayLike) -> jax.Array:
  """Returns ``x ** -q`` elementwise for ``x >= 0`` and ``0 <= q <= 1``.

  ``x ** -0`` is 1 (also at ``x = 0``) and ``0 ** -q`` is ``inf`` for ``q > 0``;
  callers that allow ``x = 0`` guard the product themselves. When ``q`` is a
  Python number the cheapest exact form is chosen while tracing (see the module
  docstring); every form agrees with ``jnp.power`` to float32 round-off.

  Args:
    x: non-negative floating-point array.
    q: the exponent, a Python number (fast paths) or an array (``jnp.power``).

  Returns:
    ``x ** -q``, with the dtype and shape of ``x``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from padam_jax._power import inverse_power
    >>> print(inverse_power(jnp.array([0.0, 1e-8, 16.0]), 0.25))
    [  inf 100.    0.5]
  """
  exponent = static_exponent(q)
  if exponent is not None:
    if exponent == 0.0:
      return jnp.ones_like(x)
    bits = dyadic_bits(exponent)
    if bits is not None:
      return _sqrt_chain(x, bits)
    if 0.0 < exponent < 1.0 and x.dtype in _REDUCED_DTYPES:
      return _reduced_exp_log(x, exponent)
  return jnp.power(x, -jnp.asarray(q, x.dtype))
