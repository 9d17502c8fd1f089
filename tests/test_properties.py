"""Property-based sweep: any hyperparameters and gradients, a clear error or finite updates.

Every optimizer of the library, built from hyperparameters drawn from valid and
invalid values, either raises ``ValueError``/``TypeError`` when built, or returns
updates with the gradients' tree structure and dtypes that are finite wherever the
gradients and parameters are. Leaves have two fixed shapes and no ``jit``, so no
example compiles more than the operations it is the first to meet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("hypothesis", reason="the property sweep needs hypothesis (the test extra)")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import padam_jax

# The strict-promotion fixture of conftest.py wraps every example of a test.
SETTINGS = settings(
  max_examples=15,  # each example runs op by op; the ops compile once, on first meeting
  derandomize=True,  # the same examples on every run: the suite does not flake
  deadline=None,
  database=None,
  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32, jnp.complex64]
if jax.config.jax_enable_x64:
  DTYPES.append(jnp.float64)
SHAPES = [(3,), (2, 2)]

# Invalid values among valid ones: each optimizer must reject them when built.
P = st.one_of(
  st.floats(0.0, 0.5),
  st.sampled_from([-0.1, 0.6, float("nan"), "a", None, np.array([0.1, 0.2]), np.array(0.25)]),
)
EPS = st.sampled_from([0.0, 1e-8, 1e-6, 1e-3, -1e-8])
DECAY = st.sampled_from([0.0, 0.5, 0.9, 0.999, 1.0])
WEIGHT_DECAY = st.sampled_from([0.0, 1e-4, 0.1, -1e-3])
LEARNING_RATE = st.sampled_from([1e-3, 0.1, 1.0])

OPTIMIZERS = {
  "padam": lambda d: padam_jax.padam(
    d(LEARNING_RATE),
    d(P),
    d(DECAY),
    d(DECAY),
    d(EPS),
    d(WEIGHT_DECAY),
    bias_correction=d(st.booleans()),
  ),
  "padamw": lambda d: padam_jax.padamw(
    d(LEARNING_RATE), d(P), d(DECAY), d(DECAY), d(EPS), d(WEIGHT_DECAY)
  ),
  "partial_adam": lambda d: padam_jax.partial_adam(
    d(LEARNING_RATE),
    d(P),
    d(DECAY),
    d(DECAY),
    d(EPS),
    d(WEIGHT_DECAY),
    bias_correction=d(st.booleans()),
  ),
  "partial_adamax": lambda d: padam_jax.partial_adamax(
    d(LEARNING_RATE), d(P), d(DECAY), d(DECAY), d(EPS), d(WEIGHT_DECAY)
  ),
  "partial_rmsprop": lambda d: padam_jax.partial_rmsprop(
    d(LEARNING_RATE),
    d(P),
    d(DECAY),
    d(EPS),
    d(st.sampled_from([0.0, 0.1])),
    d(st.sampled_from([None, 0.9])),
    d(st.booleans()),
    d(WEIGHT_DECAY),
  ),
  "partial_adagrad": lambda d: padam_jax.partial_adagrad(
    d(LEARNING_RATE), d(P), d(st.sampled_from([0.0, 0.1])), d(EPS), d(WEIGHT_DECAY)
  ),
  "partial_adadelta": lambda d: padam_jax.partial_adadelta(
    d(LEARNING_RATE), d(P), d(DECAY), d(EPS), d(WEIGHT_DECAY)
  ),
  "adabound": lambda d: padam_jax.adabound(
    d(LEARNING_RATE),
    d(st.sampled_from([0.0, 0.1])),
    d(DECAY),
    d(DECAY),
    d(EPS),
    d(st.sampled_from([1e-3, 0.0])),
    d(WEIGHT_DECAY),
    amsbound=d(st.booleans()),
  ),
  "anneal_p": lambda d: padam_jax.padam(
    0.1, padam_jax.anneal_p(d(st.sampled_from([1, 3, 0])), d(P), d(P))
  ),
}


def special_values(dtype):
  """Finite values that stress a rule in ``dtype``: zeros, subnormals, the largest."""
  info = jnp.finfo(dtype)
  tiny = float(info.smallest_subnormal)
  huge = float(info.max)
  return [0.0, -0.0, tiny, -tiny, float(info.tiny), 1e-3, -1.0, 3.0, huge / 4, -huge / 4]


@st.composite
def leaves(draw, dtype):
  shape = draw(st.sampled_from(SHAPES))
  real_dtype = jnp.finfo(dtype).dtype
  values = st.sampled_from(special_values(real_dtype))

  def draw_part():
    return np.array(
      draw(st.lists(values, min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))), np.float64
    ).reshape(shape)

  array = draw_part() + 1j * draw_part() if dtype == jnp.complex64 else draw_part()
  return jnp.asarray(array, dtype)


@st.composite
def gradients_and_params(draw):
  """A tree of gradient leaves and ``None``s (maybe empty) and parameters of its structure."""
  names = draw(st.lists(st.sampled_from("abcn"), unique=True, max_size=3))
  grads, params = {}, {}
  for name in names:
    if name == "n":
      grads[name] = params[name] = None
      continue
    dtype = draw(st.sampled_from(DTYPES))
    g = draw(leaves(dtype))
    grads[name] = g
    # One drawn value everywhere, built on the host: no op compiles for the harness.
    value = np.asarray(draw(leaves(dtype))).reshape(-1)[0]
    params[name] = jnp.asarray(np.full(g.shape, value, value.dtype))
  nested = draw(st.booleans())
  return ({"inner": grads}, {"inner": params}) if nested else (grads, params)


def is_none(x):
  return x is None


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@SETTINGS
@given(data=st.data(), tree=gradients_and_params(), steps=st.integers(1, 3))
def test_optimizer_rejects_bad_hyperparameters_or_gives_finite_updates(name, data, tree, steps):
  grads, params = tree
  try:
    tx = OPTIMIZERS[name](data.draw)
  except (ValueError, TypeError) as error:
    assert str(error), "an error without a message"
    return
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
  assert jax.tree.structure(updates, is_leaf=is_none) == jax.tree.structure(grads, is_leaf=is_none)
  for g, u in zip(jax.tree.leaves(grads), jax.tree.leaves(updates), strict=True):
    assert u.dtype == g.dtype and u.shape == g.shape
    widened = np.asarray(u).astype(np.complex64 if u.dtype == jnp.complex64 else np.float32)
    assert np.all(np.isfinite(widened)), (u, g)
