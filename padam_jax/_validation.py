"""Argument checks shared by the optimizer factories.

Factories validate plain numbers eagerly, when the optimizer is built, so a bad
hyperparameter fails at the line that wrote it. Traced values (inside ``jit`` or
``optax.inject_hyperparams``) and schedules cannot be inspected without running
JAX and are passed through unchecked.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_float(value: Any) -> float | None:
  """Returns ``value`` as a Python float when it is a concrete scalar, else None."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, bool):
    raise TypeError(f"expected a number, got the bool {value!r}")
  try:
    array = np.asarray(value)
  except Exception:
    return None
  if array.shape != () or not np.issubdtype(array.dtype, np.number):
    return None
  return float(array)


def check_interval(
  name: str,
  value: Any,
  low: float,
  high: float = math.inf,
  *,
  low_open: bool = False,
  high_open: bool = False,
  description: str | None = None,
) -> None:
  """Raises ``ValueError`` naming ``name`` if a concrete ``value`` is out of range.

  Args:
    name: the argument's name, as the user wrote it.
    value: the argument; schedules and traced values are not checked.
    low: lower end of the valid interval.
    high: upper end of the valid interval.
    low_open: whether ``low`` itself is excluded.
    high_open: whether ``high`` itself is excluded.
    description: optional words appended to the message (why the range).
  """
  x = concrete_float(value)
  if x is None:
    return
  too_low = x <= low if low_open else x < low
  too_high = x >= high if high_open else x > high
  if math.isfinite(x) and not too_low and not too_high:
    return
  left = "(" if low_open else "["
  right = ")" if high_open or math.isinf(high) else "]"
  upper = "inf" if math.isinf(high) else f"{high:g}"
  message = f"{name} must be a finite number in {left}{low:g}, {upper}{right}, got {value!r}"
  if description:
    message += f" ({description})"
  raise ValueError(message)


def check_betas(b1: Any, b2: Any) -> None:
  """Checks the two moment decay rates of an Adam-like method."""
  check_interval("b1", b1, 0.0, 1.0, high_open=True)
  check_interval("b2", b2, 0.0, 1.0, high_open=True)


def check_partial_power(p: Any) -> None:
  """Checks the partially adaptive exponent ``p``: one real number in ``[0, 1/2]`` or a schedule.

  Raises:
    TypeError: ``p`` is not a real number (a string, ``None``, a complex number, a bool).
    ValueError: ``p`` is an array of several values, or out of range.
  """
  if callable(p) or isinstance(p, jax.core.Tracer):
    return
  if not isinstance(p, (bool, np.bool_)):  # a bool gets concrete_float's TypeError
    try:
      array = np.asarray(p)
    except Exception:
      array = None
    real = array is not None and (
      jnp.issubdtype(array.dtype, jnp.integer) or jnp.issubdtype(array.dtype, jnp.floating)
    )
    if not real:
      raise TypeError(
        f"p must be a real number in [0, 1/2] or a schedule (a callable of the step count), "
        f"got {p!r}"
      )
    if array.shape != ():
      raise ValueError(
        f"p must be a single number in [0, 1/2] or a schedule, got an array of shape "
        f"{array.shape}: {p!r}"
      )
  check_interval(
    "p",
    p,
    0.0,
    0.5,
    description="p=1/2 is the fully adaptive method, p=0 is momentum SGD",
  )


def state_dtype(name: str, value: Any, *, real: bool = True) -> jnp.dtype | None:
  """The dtype a state field is kept in, ``None`` for the default (the parameters' dtype).

  Raises:
    TypeError: ``value`` names no dtype, or one that is not floating (``real``) or inexact.
  """
  if value is None:
    return None
  what = "floating-point" if real else "floating-point or complex"
  message = f"{name} must be a {what} dtype or None, got {value!r}"
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    raise TypeError(message) from None
  if not jnp.issubdtype(dtype, jnp.floating if real else jnp.inexact):
    raise TypeError(message)
  return dtype
