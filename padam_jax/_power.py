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
- any other ``q`` in ``(0, 1)`` (``p`` = 1/5, 2/5, ...), float32 and narrower:
  ``exp`` and ``log`` after an exact range reduction, ``x = m * 2**e`` with
  ``m`` near 1. A bare ``exp(-q * log(x))`` would lose ``log2(|q log x|)`` bits
  (tens of ulp at ``x = 1e-30``); splitting ``-q * e`` exactly into an integer
  and a fraction keeps every factor accurate to a few ulp, and leaves ``exp``
  and ``log`` on ranges short enough for short series.
- a traced ``q`` (a schedule's value, ``optax.inject_hyperparams``), the
  general path: the same reduced ``exp``/``log`` form for float32 and
  narrower dtypes (which XLA:CPU evaluates several times faster than
  ``jnp.power``, and more accurately), ``jnp.power`` for other dtypes. A traced
  ``q`` must lie in ``[0, 1]``: it cannot be checked while tracing.
- a static ``q`` outside ``[0, 1]`` or a dtype without a fast form: ``jnp.power``.
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


def _log1p_series(degree: int = 9) -> tuple[np.float32, ...]:
  """Coefficients ``c`` with ``log(1 + u) ~ u * sum(c[k] u**k)`` on the reduced range.

  A least-squares fit at Chebyshev nodes of ``[sqrt(1/2) - 1, sqrt(2) - 1]``
  (near-minimax): absolute error below ``3e-9`` with float32 coefficients. A
  polynomial, not ``2 atanh((m-1)/(m+1))``: XLA:CPU will not fuse a division
  used twice into the step's kernel, and would spend two more array passes.
  """
  low, high = math.sqrt(0.5) - 1, math.sqrt(2) - 1
  nodes = (low + high) / 2 + (high - low) / 2 * np.cos((np.arange(200) + 0.5) * np.pi / 200)
  fit = np.polynomial.Polynomial.fit(nodes, np.log1p(nodes) / nodes, degree).convert()
  return tuple(np.float32(c) for c in fit.coef)


_LOG1P = _log1p_series()

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
  """``prod_j (1/x) ** (2 ** -j)``: ``0 -> inf`` and ``inf -> 0`` as the power does.

  Roots are taken of the reciprocal, not the reciprocal of roots: XLA rewrites
  ``1 / sqrt(a)`` as ``rsqrt(a)``, which XLA:CPU evaluates several times more
  slowly than a square root and a division. The reciprocal overflows only for
  subnormal ``x`` (below ``2**-126`` in float32).
  """
  root = 1 / x
  product = None
  for depth in range(bits[-1] + 1):
    if depth:
      root = jnp.sqrt(root)
    if depth in bits:
      product = root if product is None else product * root
  return product


def _power_of_two(n: jax.Array) -> jax.Array:
  """``2.0 ** n`` in float32, exact, for integer ``n`` in ``[-126, 127]``."""
  return jax.lax.bitcast_convert_type((n + 127) << 23, jnp.float32)


def _split_exponent(q: float | jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``q`` as float32 ``(q, q_hi, q_lo)`` with ``q_hi`` a multiple of ``2**-12``.

  ``q_hi * e`` is then exact in float32 for every exponent ``|e| <= 2**9``, and
  ``q_lo = q - q_hi`` is exact too (a few bits below ``q``'s leading bit).
  """
  if isinstance(q, float):  # while tracing, in float64
    q_hi = math.ldexp(round(math.ldexp(q, _Q_HI_BITS)), -_Q_HI_BITS)
    return np.float32(q), np.float32(q_hi), np.float32(q - q_hi)
  q = jnp.asarray(q).astype(jnp.float32)
  q_hi = jnp.round(q * 2.0**_Q_HI_BITS) * 2.0**-_Q_HI_BITS  # scalings by 2**k are exact
  return q, q_hi, q - q_hi


def _reduced_exp_log(x: jax.Array, q: float | jax.Array) -> jax.Array:
  """``x ** -q`` in float32 through ``exp``/``log`` after an exact range reduction.

  ``x = m * 2**e`` with ``m`` in ``[sqrt(1/2), sqrt(2))`` (read from the bits),
  ``-q * e = n + f`` exactly, and ``x ** -q = 2**n * 2**(f - q log2 m)``: the
  exponent left for ``exp`` stays within ``[-1, 1]``, so it carries no more
  than float32 round-off whatever ``x`` is. On these short ranges ``log`` and
  ``exp`` are polynomials (``log(1 + u)`` of degree 10, see :func:`_log1p_series`,
  and Taylor's ``exp`` of degree 7 on ``[-ln2/2, ln2/2]``; both errors are below
  ``2**-27``), several times cheaper on XLA:CPU than ``jnp.log``/``jnp.exp``,
  whose own range reductions would repeat work done here.
  """
  dtype = x.dtype
  x = x.astype(jnp.float32)
  q, q_hi, q_lo = _split_exponent(q)
  subnormal = x < np.float32(2.0**-126)  # rescaled so the exponent bits are exact
  scaled = jnp.where(subnormal, x * np.float32(2.0**24), x)
  bits = jax.lax.bitcast_convert_type(scaled, jnp.int32)
  mantissa = jax.lax.bitcast_convert_type((bits & 0x007FFFFF) | 0x3F000000, jnp.float32)
  exponent = ((bits >> 23) & 0xFF) - 126 - jnp.where(subnormal, 24, 0)
  low = mantissa < np.float32(math.sqrt(0.5))  # [1/2, 1) -> [sqrt(1/2), sqrt(2))
  mantissa = jnp.where(low, mantissa + mantissa, mantissa)
  e = (exponent - low.astype(jnp.int32)).astype(jnp.float32)
  u = mantissa - 1  # exact; in [-0.293, 0.415)
  series = _LOG1P[-1]
  for c in reversed(_LOG1P[:-1]):
    series = series * u + c
  log2_mantissa = u * series * np.float32(1 / math.log(2))
  t = -q_hi * e  # exact
  n = jnp.round(t)
  a = ((t - n) - q_lo * e) - q * log2_mantissa  # |a| <= 1
  n2 = jnp.round(a)
  z = (a - n2) * np.float32(math.log(2))  # |z| <= ln(2) / 2
  y = np.float32(1 / 5040)
  for k in (720, 120, 24, 6, 2, 1, 1):
    y = y * z + np.float32(1 / k)
  # |n| <= 151 for q in [0, 1]: two exact factors of about 2**(n/2) stay normal.
  n = (n + n2).astype(jnp.int32)
  half = n >> 1
  y = y * _power_of_two(half) * _power_of_two(n - half)
  # 0 ** -q = inf, inf ** -q = 0, NaN (and x < 0) give NaN, as for the power.
  y = jnp.where(x == 0, jnp.inf, jnp.where(x == jnp.inf, 0, y))
  y = jnp.where(x >= 0, y, jnp.nan)
  return y.astype(dtype)


def inverse_power(x: jax.Array, q: jax.typing.ArrayLike) -> jax.Array:
  """Returns ``x ** -q`` elementwise for ``x >= 0`` and ``0 <= q <= 1``.

  ``x ** -0`` is 1 (also at ``x = 0``) and ``0 ** -q`` is ``inf`` for ``q > 0``;
  callers that allow ``x = 0`` guard the product themselves. When ``q`` is a
  Python number the cheapest exact form is chosen while tracing (see the module
  docstring); every form agrees with the exact power to float32 round-off.

  Args:
    x: non-negative floating-point array.
    q: the exponent: a Python number (a form chosen while tracing) or a scalar
      array (traced: the reduced ``exp``/``log`` form for float32 and narrower,
      ``jnp.power`` otherwise).

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
  elif x.dtype in _REDUCED_DTYPES and jnp.ndim(q) == 0:
    y = _reduced_exp_log(x, q)
    return jnp.where(jnp.asarray(q) == 0, jnp.ones_like(y), y)  # x ** -0 = 1, also at 0
  return jnp.power(x, -jnp.asarray(q, x.dtype))
