"""AdaBound and AMSBound against a NumPy loop of the rule, with a learning-rate schedule.

The reference is written from the update rule (Luo et al., 2019, and the
authors' reference code as summarised in the project's notes): coupled L2 decay,
Adam's moments, the step ``lr_t sqrt(1-b2^t)/(1-b1^t) / (sqrt(v_t) + eps)``
clipped into ``final_lr * lr_t / lr_0 * [1 - 1/(gamma t + 1), 1 + 1/(gamma t)]``
and multiplied by ``m_t``; AMSBound uses the running max of the raw ``v``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import initial_params, mixed_scale_gradients, relative_deviation

import padam_jax

STEPS = 150
# As for Padam: float32 against float64, with relative_deviation's 1e-3 floor.
TOLERANCE = 2.5e-4


class AdaBoundReference:
  """One leaf of AdaBound / AMSBound in float64; ``update`` returns the additive update."""

  def __init__(self, lr0, final_lr, b1=0.9, b2=0.999, eps=1e-8, gamma=1e-3, wd=0.0, amsbound=False):
    self.lr0, self.final_lr, self.b1, self.b2 = lr0, final_lr, b1, b2
    self.eps, self.gamma, self.wd, self.amsbound = eps, gamma, wd, amsbound
    self.t = 0
    self.m = self.v = self.vmax = None
    self.clipped_low = self.clipped_high = self.free = self.below_max = 0

  def update(self, g, x, lr):
    g = np.asarray(g, np.float64) + self.wd * np.asarray(x, np.float64)
    if self.m is None:
      self.m, self.v, self.vmax = np.zeros_like(g), np.zeros_like(g), np.zeros_like(g)
    self.t += 1
    t = self.t
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g * g
    self.vmax = np.maximum(self.vmax, self.v)
    v = self.vmax if self.amsbound else self.v
    with np.errstate(divide="ignore"):
      step = lr * math.sqrt(1 - self.b2**t) / (1 - self.b1**t) / (np.sqrt(v) + self.eps)
    final = self.final_lr * lr / self.lr0
    lower = final * (1 - 1 / (self.gamma * t + 1))
    upper = final * (1 + 1 / (self.gamma * t))
    live = self.m != 0  # where the step matters
    self.clipped_low += int(np.sum(live & (step < lower)))
    self.clipped_high += int(np.sum(live & (step > upper)))
    free = live & (step >= lower) & (step <= upper)
    self.free += int(np.sum(free))
    # Free steps where v is well below its max: AdaBound and AMSBound differ there.
    self.below_max += int(np.sum(free & (self.v < 0.9 * self.vmax)))
    return -np.clip(step, lower, upper) * self.m


def lr_schedule_reference(t):
  """0.01 for 50 steps, then x0.1, then x0.1 again from step 100 (the schedule below)."""
  return 0.01 * (0.1 if t >= 50 else 1.0) * (0.1 if t >= 100 else 1.0)


LR_SCHEDULE = optax.piecewise_constant_schedule(0.01, {50: 0.1, 100: 0.1})


def run(tx, make_reference, lr_at, steps=STEPS):
  # Ten times larger gradients for the first 30 steps, so that v later falls below
  # its running max and AMSBound's denominator differs from AdaBound's.
  grads = [
    {k: v * np.float32(10.0 if t < 30 else 1.0) for k, v in g.items()}
    for t, g in enumerate(mixed_scale_gradients(steps, seed=5))
  ]
  params = {k: jnp.asarray(v) for k, v in initial_params().items()}
  refs = {k: make_reference() for k in params}
  state = tx.init(params)
  update = jax.jit(tx.update)
  worst = 0.0
  for t, g in enumerate(grads):
    g = {k: jnp.asarray(v) for k, v in g.items()}
    updates, state = update(g, state, params)
    for k in params:
      expected = refs[k].update(g[k], params[k], lr_at(t))
      assert np.all(np.isfinite(np.asarray(updates[k])))
      worst = max(worst, relative_deviation(updates[k], expected))
    params = optax.apply_updates(params, updates)
  return worst, refs


SETTINGS = {
  # gamma 0.05: the bounds close within the run, so both clips and free steps occur.
  "scheduled-gamma0.05-wd": dict(final_lr=0.1, gamma=0.05, weight_decay=5e-4),
  # final_lr 1e-3 / 3e-3: the unit-scale leaf mostly moves freely inside the
  # bounds, and with b2 = 0.99 its v falls below the running max (AMSBound).
  "scheduled-b2-0.99": dict(final_lr=1e-3, gamma=1e-3, b2=0.99),
  "scheduled-eps0-b2-0.99": dict(final_lr=3e-3, gamma=1e-3, eps=0.0, b2=0.99),
}


def measure(setting, amsbound):
  kwargs = dict(SETTINGS[setting])
  wd = kwargs.pop("weight_decay", 0.0)
  factory = padam_jax.amsbound if amsbound else padam_jax.adabound
  tx = factory(LR_SCHEDULE, weight_decay=wd, **kwargs)
  return run(
    tx,
    lambda: AdaBoundReference(0.01, wd=wd, amsbound=amsbound, **kwargs),
    lr_schedule_reference,
  )


@pytest.mark.standard_promotion  # optax.piecewise_constant_schedule mixes int32 and float
@pytest.mark.parametrize("amsbound", [False, True], ids=["adabound", "amsbound"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_matches_numpy_loop_with_a_schedule(setting, amsbound):
  worst, refs = measure(setting, amsbound)
  assert worst < TOLERANCE, f"max relative deviation {worst:.2e}"
  if setting.startswith("scheduled-gamma0.05"):
    # The run exercises all three branches of the clip.
    assert sum(r.clipped_low for r in refs.values()) > 0
    assert sum(r.clipped_high for r in refs.values()) > 0
    assert sum(r.free for r in refs.values()) > 0
  if not setting.startswith("scheduled-gamma0.05"):
    assert sum(r.free for r in refs.values()) > 500
    assert sum(r.below_max for r in refs.values()) > 100  # AMSBound's max is exercised


def nonzero_gradients(steps):
  return [
    {k: np.where(v == 0, np.float32(1e-3), v) for k, v in g.items()}
    for g in mixed_scale_gradients(steps, seed=6)
  ]


def assert_same_updates(tx, other, grads, rtol=1e-5):
  params = {k: jnp.asarray(v) for k, v in initial_params().items()}
  s1, s2 = tx.init(params), other.init(params)
  for g in grads:
    g = {k: jnp.asarray(v) for k, v in g.items()}
    u1, s1 = tx.update(g, s1, params)
    u2, s2 = other.update(g, s2, params)
    for k in params:
      scale = float(jnp.max(jnp.abs(u2[k])))
      np.testing.assert_allclose(u1[k], u2[k], rtol=rtol, atol=1e-6 * scale, err_msg=k)
    params = optax.apply_updates(params, u2)


@pytest.mark.standard_promotion  # optax.adam mixes int32 and float
def test_bounds_that_never_bind_give_adam():
  # gamma tiny: lower ~ gamma t final ~ 1e-7, upper ~ 1 / (gamma t): never active.
  tx = padam_jax.adabound(1e-3, final_lr=1.0, gamma=1e-9, eps=0.0)
  assert_same_updates(tx, optax.adam(1e-3, eps=0.0), nonzero_gradients(100))


def test_closed_bounds_give_sgd_momentum():
  # gamma huge: both bounds are final_lr to 1e-7, and m = (1 - b1) * SGD's trace.
  tx = padam_jax.adabound(1e-3, final_lr=0.1, gamma=1e7)
  assert_same_updates(tx, optax.sgd(0.1 * (1 - 0.9), momentum=0.9), mixed_scale_gradients(100))


def test_amsbound_differs_from_adabound_once_v_shrinks():
  grads = [jnp.array([1.0])] * 5 + [jnp.array([1e-2])] * 40
  params = jnp.zeros(1)
  a = padam_jax.adabound(1e-3, final_lr=1.0, gamma=1e-9, b2=0.9)  # bounds never bind
  b = padam_jax.amsbound(1e-3, final_lr=1.0, gamma=1e-9, b2=0.9)
  sa, sb = a.init(params), b.init(params)
  for g in grads:
    ua, sa = a.update(g, sa, params)
    ub, sb = b.update(g, sb, params)
  assert abs(float(ua[0])) > 2 * abs(float(ub[0]))


def test_state_holds_the_max_only_for_amsbound():
  params = {"w": jnp.ones(3)}
  ada = padam_jax.scale_by_adabound().init(params)
  ams = padam_jax.scale_by_adabound(amsbound=True, mu_dtype=jnp.bfloat16).init(params)
  assert isinstance(ada, padam_jax.ScaleByAdaboundState)
  assert ada.nu_max is None
  assert ams.nu_max["w"].dtype == jnp.float32
  assert ams.mu["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
  ("kwargs", "name"),
  [
    (dict(gamma=0.0), "gamma"),
    (dict(gamma=-1e-3), "gamma"),
    (dict(final_lr=-0.1), "final_lr"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(b1=1.0), "b1"),
    (dict(b2=-0.1), "b2"),
    (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-1e-4), "weight_decay"),
  ],
)
def test_bad_argument_is_rejected_when_built(kwargs, name):
  for factory in (padam_jax.adabound, padam_jax.amsbound):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
      factory(**kwargs)
