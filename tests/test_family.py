"""The partially adaptive family against NumPy loops of its formulas, and its limits.

Each reference below is written from the update rule in the docstring of the
rule it checks (float64, one leaf at a time); none calls padam_jax. At p = 1/2
each rule is checked against its fully adaptive parent in Optax where the two
share conventions, and at p = 0 against SGD or SGD with momentum.
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

STEPS = 120
P_VALUES = [0.0, 1 / 8, 1 / 4, 1 / 2]
# float32 arithmetic against a float64 reference over 120 steps, the bound used for
# Padam: a moment that nearly cancels (1e-3 of the leaf's largest update, the
# floor of relative_deviation) keeps float32 round-off of its terms, ~1e-7 x 1e3.
TOLERANCE = 2.5e-4


# --- NumPy references ------------------------------------------------------------


def _partial(numerator, denominator, two_p):
  """numerator / denominator**two_p, with 0/0 (never a gradient) taken as 0."""
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(denominator == 0, 0.0, numerator / denominator**two_p)


class Reference:
  """Per-leaf float64 loop; ``update`` returns the additive parameter update."""

  def __init__(self, p, wd=0.0, **hp):
    self.p, self.wd, self.hp, self.t, self.s = p, wd, hp, 0, None

  def p_now(self):
    return self.p(self.t) if callable(self.p) else self.p

  def update(self, g, x, lr):
    g, x = np.asarray(g, np.float64), np.asarray(x, np.float64)
    if self.s is None:
      self.s = self.init(g)
    two_p = 2 * self.p_now()
    self.t += 1
    return self.step(g + self.wd * x, x, lr, two_p)


class PartialAdamRef(Reference):
  def init(self, g):
    return {"m": np.zeros_like(g), "v": np.zeros_like(g)}

  def step(self, g, x, lr, two_p):
    b1, b2, eps = self.hp.get("b1", 0.9), self.hp.get("b2", 0.999), self.hp.get("eps", 1e-8)
    s, t = self.s, self.t
    s["m"] = b1 * s["m"] + (1 - b1) * g
    s["v"] = b2 * s["v"] + (1 - b2) * g**2
    c = math.sqrt(1 - b2**t) / (1 - b1**t) if self.hp.get("bias_correction", True) else 1.0
    return -lr * c * _partial(s["m"], np.sqrt(s["v"]) + eps, two_p)


class PadamWRef(Reference):
  """AMSGrad-form Padam on the raw gradient, then x * wd added (decoupled), all times lr."""

  def __init__(self, p, wd=0.0, **hp):
    super().__init__(p, 0.0, **hp)
    self.decoupled = wd

  def init(self, g):
    return {"m": np.zeros_like(g), "v": np.zeros_like(g), "vhat": np.zeros_like(g)}

  def step(self, g, x, lr, two_p):
    b1, b2, eps = 0.9, 0.999, 1e-8
    s, t = self.s, self.t
    s["m"] = b1 * s["m"] + (1 - b1) * g
    s["v"] = b2 * s["v"] + (1 - b2) * g**2
    s["vhat"] = np.maximum(s["vhat"], s["v"])
    c = math.sqrt(1 - b2**t) / (1 - b1**t)
    return -lr * (c * _partial(s["m"], np.sqrt(s["vhat"]) + eps, two_p) + self.decoupled * x)


class PartialRmsRef(Reference):
  def init(self, g):
    return {"v": np.full_like(g, self.hp.get("initial_scale", 0.0)), "b": np.zeros_like(g)}

  def step(self, g, x, lr, two_p):
    rho, eps, mu = self.hp.get("decay", 0.9), self.hp.get("eps", 1e-8), self.hp.get("momentum")
    s = self.s
    s["v"] = rho * s["v"] + (1 - rho) * g**2
    direction = _partial(g, np.sqrt(s["v"]) + eps, two_p)
    if mu is not None:
      s["b"] = mu * s["b"] + direction
      direction = s["b"]
    return -lr * direction


class PartialAdagradRef(Reference):
  def init(self, g):
    return {"G": np.full_like(g, self.hp.get("initial_accumulator_value", 0.0))}

  def step(self, g, x, lr, two_p):
    self.s["G"] = self.s["G"] + g**2
    return -lr * _partial(g, np.sqrt(self.s["G"]) + self.hp.get("eps", 1e-10), two_p)


class PartialAdamaxRef(Reference):
  def init(self, g):
    return {"m": np.zeros_like(g), "u": np.zeros_like(g)}

  def step(self, g, x, lr, two_p):
    b1, b2, eps = self.hp.get("b1", 0.9), self.hp.get("b2", 0.999), self.hp.get("eps", 1e-8)
    s, t = self.s, self.t
    s["m"] = b1 * s["m"] + (1 - b1) * g
    s["u"] = np.maximum(b2 * s["u"], np.abs(g) + eps)
    return -lr / (1 - b1**t) * _partial(s["m"], s["u"], two_p)


class PartialAdadeltaRef(Reference):
  def init(self, g):
    return {"eg": np.zeros_like(g), "ex": np.zeros_like(g)}

  def step(self, g, x, lr, two_p):
    rho, eps = self.hp.get("rho", 0.9), self.hp.get("eps", 1e-6)
    s = self.s
    s["eg"] = rho * s["eg"] + (1 - rho) * g**2
    ratio = np.sqrt(s["eg"] + eps) / np.sqrt(s["ex"] + eps)
    u = g / ratio**two_p
    s["ex"] = rho * s["ex"] + (1 - rho) * u**2
    return -lr * u


def run_against_reference(tx, make_reference, lr_at, steps=STEPS, seed=0):
  """Runs ``tx`` (jitted) and one reference per leaf; returns the max relative deviation."""
  grads = mixed_scale_gradients(steps, seed=seed)
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
      assert np.all(np.isfinite(np.asarray(updates[k]))), k
      worst = max(worst, relative_deviation(updates[k], expected))
    params = optax.apply_updates(params, updates)
  return worst


def schedule_lr(t):
  """The reference side of LR_SCHEDULE: 0.1, x0.1 from step 40 and again from 80."""
  return 0.1 * (0.1 if t >= 40 else 1.0) * (0.1 if t >= 80 else 1.0)


LR_SCHEDULE = optax.piecewise_constant_schedule(0.1, {40: 0.1, 80: 0.1})


def constant_lr(lr):
  """The reference side of a constant learning rate."""
  return lambda t: lr


# name -> (library factory(p, wd, lr), reference factory(p, wd), lr on the reference side)
RULES = {
  "partial_adam": (
    lambda p, wd, lr: padam_jax.partial_adam(lr, p=p, weight_decay=wd),
    lambda p, wd: PartialAdamRef(p, wd),
  ),
  "partial_adam_algorithm_1_form": (
    lambda p, wd, lr: padam_jax.partial_adam(
      lr, p=p, eps=0.0, weight_decay=wd, bias_correction=False
    ),
    lambda p, wd: PartialAdamRef(p, wd, eps=0.0, bias_correction=False),
  ),
  "padamw": (
    lambda p, wd, lr: padam_jax.padamw(lr, p=p, weight_decay=10 * wd),
    lambda p, wd: PadamWRef(p, 10 * wd),
  ),
  "partial_rmsprop": (
    lambda p, wd, lr: padam_jax.partial_rmsprop(lr, p=p, decay=0.99, weight_decay=wd),
    lambda p, wd: PartialRmsRef(p, wd, decay=0.99),
  ),
  "partial_rmsprop_momentum_eps0": (
    lambda p, wd, lr: padam_jax.partial_rmsprop(lr, p=p, eps=0.0, momentum=0.9, weight_decay=wd),
    lambda p, wd: PartialRmsRef(p, wd, eps=0.0, momentum=0.9),
  ),
  "partial_adagrad": (
    lambda p, wd, lr: padam_jax.partial_adagrad(lr, p=p, weight_decay=wd),
    lambda p, wd: PartialAdagradRef(p, wd),
  ),
  "partial_adagrad_eps0_init": (
    lambda p, wd, lr: padam_jax.partial_adagrad(
      lr, p=p, initial_accumulator_value=0.1, eps=0.0, weight_decay=wd
    ),
    lambda p, wd: PartialAdagradRef(p, wd, initial_accumulator_value=0.1, eps=0.0),
  ),
  "partial_adamax": (
    lambda p, wd, lr: padam_jax.partial_adamax(lr, p=p, weight_decay=wd),
    lambda p, wd: PartialAdamaxRef(p, wd),
  ),
  "partial_adamax_eps0": (
    lambda p, wd, lr: padam_jax.partial_adamax(lr, p=p, eps=0.0, b2=0.99, weight_decay=wd),
    lambda p, wd: PartialAdamaxRef(p, wd, eps=0.0, b2=0.99),
  ),
  "partial_adadelta": (
    lambda p, wd, lr: padam_jax.partial_adadelta(lr, p=p, rho=0.95, weight_decay=wd),
    lambda p, wd: PartialAdadeltaRef(p, wd, rho=0.95),
  ),
}


def measure(name, p, weight_decay=5e-4, scheduled=True):
  """Max relative deviation of rule ``name`` from its NumPy loop."""
  make, make_ref = RULES[name]
  lr = LR_SCHEDULE if scheduled else 0.1
  lr_at = schedule_lr if scheduled else constant_lr(0.1)
  return run_against_reference(make(p, weight_decay, lr), lambda: make_ref(p, weight_decay), lr_at)


@pytest.mark.standard_promotion  # optax.piecewise_constant_schedule mixes int32 and float
@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_matches_its_numpy_loop(name, p):
  worst = measure(name, p)
  assert worst < TOLERANCE, f"{name} p={p}: max relative deviation {worst:.2e}"


@pytest.mark.parametrize("name", ["partial_adam", "partial_rmsprop", "partial_adadelta"])
def test_rule_with_constant_lr_and_no_decay_matches_its_numpy_loop(name):
  worst = measure(name, 0.125, weight_decay=0.0, scheduled=False)
  assert worst < TOLERANCE


def annealed_p_reference(t, steps=100, init=0.5, end=0.125):
  s = min(1.0, max(0.0, t / steps))
  return end + (init - end) * 0.5 * (1 + math.cos(math.pi * s))


@pytest.mark.parametrize("name", ["partial_adam", "partial_rmsprop", "partial_adamax"])
def test_annealed_p_matches_the_numpy_loop_with_p_per_step(name):
  make, make_ref = RULES[name]
  p = padam_jax.anneal_p(100, 0.5, 0.125)
  worst = run_against_reference(
    make(p, 0.0, 0.1), lambda: make_ref(annealed_p_reference, 0.0), constant_lr(0.1)
  )
  assert worst < TOLERANCE


# --- limits: p = 1/2 is the parent, p = 0 is SGD / momentum -------------------------


def nonzero_gradients(steps=STEPS):
  """Mixed-scale gradients with the zeros replaced (optax's parents divide 0 by 0)."""
  out = []
  for g in mixed_scale_gradients(steps, seed=3):
    out.append({k: np.where(v == 0, np.float32(1e-3), v) for k, v in g.items()})
  return out


def assert_same_updates(tx, parent, grads, rtol=1e-5):
  params = {k: jnp.asarray(v) for k, v in initial_params().items()}
  s1, s2 = tx.init(params), parent.init(params)
  for g in grads:
    g = {k: jnp.asarray(v) for k, v in g.items()}
    u1, s1 = tx.update(g, s1, params)
    u2, s2 = parent.update(g, s2, params)
    for k in params:
      scale = float(jnp.max(jnp.abs(u2[k])))
      np.testing.assert_allclose(u1[k], u2[k], rtol=rtol, atol=1e-6 * scale, err_msg=k)
    params = optax.apply_updates(params, u2)


PARENTS = {
  # p = 1/2 against Optax, with the arguments that make the conventions agree.
  "adam": (
    lambda: padam_jax.partial_adam(1e-3, p=0.5, b2=0.99, eps=0.0),
    lambda: optax.adam(1e-3, b2=0.99, eps=0.0),
    nonzero_gradients,
  ),
  "rmsprop": (
    lambda: padam_jax.partial_rmsprop(1e-3, p=0.5, decay=0.9, eps=1e-8, momentum=0.9),
    lambda: optax.rmsprop(1e-3, decay=0.9, eps=1e-8, eps_in_sqrt=False, momentum=0.9),
    mixed_scale_gradients,
  ),
  "adagrad": (
    lambda: padam_jax.partial_adagrad(0.1, p=0.5, initial_accumulator_value=0.1, eps=0.0),
    lambda: optax.adagrad(0.1, initial_accumulator_value=0.1, eps=0.0),
    mixed_scale_gradients,
  ),
  "adamax": (
    lambda: padam_jax.partial_adamax(2e-3, p=0.5),
    lambda: optax.adamax(2e-3),
    mixed_scale_gradients,
  ),
  "adadelta": (
    lambda: padam_jax.partial_adadelta(1.0, p=0.5, rho=0.9, eps=1e-6),
    lambda: optax.adadelta(1.0, rho=0.9, eps=1e-6),
    mixed_scale_gradients,
  ),
  # p = 0 against SGD: Adam-like rules give heavy-ball momentum at rate lr * (1 - b1).
  "adam-p0": (
    lambda: padam_jax.partial_adam(0.1, p=0.0, bias_correction=False),
    lambda: optax.sgd(0.1 * (1 - 0.9), momentum=0.9),
    mixed_scale_gradients,
  ),
  "adamax-p0": (
    lambda: padam_jax.partial_adamax(0.1, p=0.0, bias_correction=False),
    lambda: optax.sgd(0.1 * (1 - 0.9), momentum=0.9),
    mixed_scale_gradients,
  ),
  "padamw-p0": (
    lambda: padam_jax.padamw(0.1, p=0.0, weight_decay=0.0, bias_correction=False),
    lambda: optax.sgd(0.1 * (1 - 0.9), momentum=0.9),
    mixed_scale_gradients,
  ),
  "rmsprop-p0": (
    lambda: padam_jax.partial_rmsprop(0.1, p=0.0, momentum=0.9),
    lambda: optax.sgd(0.1, momentum=0.9),
    mixed_scale_gradients,
  ),
  "rmsprop-p0-no-momentum": (
    lambda: padam_jax.partial_rmsprop(0.1, p=0.0),
    lambda: optax.sgd(0.1),
    mixed_scale_gradients,
  ),
  "adagrad-p0": (
    lambda: padam_jax.partial_adagrad(0.1, p=0.0),
    lambda: optax.sgd(0.1),
    mixed_scale_gradients,
  ),
  "adadelta-p0": (
    lambda: padam_jax.partial_adadelta(0.1, p=0.0),
    lambda: optax.sgd(0.1),
    mixed_scale_gradients,
  ),
  # padamw without decay is padam; with decay at p = 1/2 checked by the NumPy loop.
  "padamw-no-decay": (
    lambda: padam_jax.padamw(0.1, p=0.125, weight_decay=0.0),
    lambda: padam_jax.padam(0.1, p=0.125),
    mixed_scale_gradients,
  ),
}


@pytest.mark.standard_promotion  # optax.adam and optax.adamax mix int32 and float
@pytest.mark.parametrize("name", sorted(PARENTS))
def test_limit_equals_the_parent(name):
  make, make_parent, grads = PARENTS[name]
  assert_same_updates(make(), make_parent(), grads(STEPS))


def test_partial_adam_differs_from_padam_once_v_shrinks():
  # Without the running max the denominator follows v down: a check that cannot
  # pass if partial_adam were padam.
  grads = [np.array([1.0], np.float32)] * 5 + [np.array([1e-3], np.float32)] * 40
  params = jnp.zeros(1)
  a, b = padam_jax.partial_adam(0.1, p=0.25, b2=0.9), padam_jax.padam(0.1, p=0.25, b2=0.9)
  sa, sb = a.init(params), b.init(params)
  for g in grads:
    ua, sa = a.update(jnp.asarray(g), sa, params)
    ub, sb = b.update(jnp.asarray(g), sb, params)
  # v fell to ~0.9^40 of its peak: sqrt(vhat / v) ** (2p) is ~2.3 at p = 1/4.
  assert abs(float(ua[0])) > 2 * abs(float(ub[0]))


def test_zero_gradients_give_zero_updates_with_eps_zero():
  params = jnp.zeros(3)
  g = jnp.array([0.0, 1.0, -2.0])
  for tx in (
    padam_jax.partial_adam(0.1, eps=0.0, bias_correction=False),
    padam_jax.partial_rmsprop(0.1, eps=0.0),
    padam_jax.partial_adagrad(0.1, eps=0.0),
    padam_jax.partial_adamax(0.1, eps=0.0),
  ):
    updates, _ = tx.update(g, tx.init(params), params)
    assert float(updates[0]) == 0.0
    assert np.all(np.isfinite(np.asarray(updates)))
    assert float(updates[1]) < 0.0 < float(updates[2])


def test_mu_dtype_is_stored():
  params = {"w": jnp.ones(3)}
  for scale_by in (padam_jax.scale_by_partial_adam, padam_jax.scale_by_partial_adamax):
    state = scale_by(mu_dtype=jnp.bfloat16).init(params)
    assert state.mu["w"].dtype == jnp.bfloat16
    assert state.nu["w"].dtype == jnp.float32


# --- anneal_p ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["cosine", "linear"])
def test_anneal_p_follows_its_formula(shape):
  p = padam_jax.anneal_p(200, init_p=0.4, end_p=0.05, transition_begin=50, shape=shape)
  for t in [0, 10, 50, 51, 100, 149, 150, 249, 250, 251, 10_000]:
    s = min(1.0, max(0.0, (t - 50) / 200))
    w = 0.5 * (1 + math.cos(math.pi * s)) if shape == "cosine" else 1 - s
    np.testing.assert_allclose(float(p(t)), 0.05 + 0.35 * w, rtol=1e-6, atol=1e-7)


def test_anneal_p_is_monotone_and_jittable():
  p = padam_jax.anneal_p(1000)
  values = np.asarray(jax.jit(jax.vmap(p))(jnp.arange(0, 1200, 7)))
  assert values[0] == np.float32(0.5)
  assert values[-1] == np.float32(0.125)
  assert np.all(np.diff(values) <= 0)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(transition_steps=0),
    dict(transition_steps=10.5),
    dict(transition_steps=10, init_p=0.6),
    dict(transition_steps=10, end_p=-0.1),
    dict(transition_steps=10, transition_begin=-1),
    dict(transition_steps=10, shape="exponential"),
  ],
)
def test_anneal_p_rejects_bad_arguments(kwargs):
  with pytest.raises(ValueError):
    padam_jax.anneal_p(**kwargs)


# --- argument checks -----------------------------------------------------------------

FACTORIES = {
  "partial_adam": padam_jax.partial_adam,
  "padamw": padam_jax.padamw,
  "partial_rmsprop": padam_jax.partial_rmsprop,
  "partial_adagrad": padam_jax.partial_adagrad,
  "partial_adamax": padam_jax.partial_adamax,
  "partial_adadelta": padam_jax.partial_adadelta,
}
BAD = {
  "partial_adam": [("p", 0.6), ("b1", 1.0), ("b2", -0.1), ("eps", -1.0), ("weight_decay", -1.0)],
  "padamw": [("p", -0.1), ("b2", 1.0), ("weight_decay", -1e-4)],
  "partial_rmsprop": [
    ("p", 0.51),
    ("decay", 1.0),
    ("eps", -1e-8),
    ("initial_scale", -1.0),
    ("momentum", 1.5),
    ("weight_decay", -1.0),
  ],
  "partial_adagrad": [("p", 1.0), ("initial_accumulator_value", -0.1), ("eps", -1.0)],
  "partial_adamax": [("p", float("nan")), ("b1", -0.5), ("b2", 1.5), ("eps", -1.0)],
  "partial_adadelta": [("p", 0.7), ("rho", 1.0), ("eps", 0.0), ("weight_decay", -1.0)],
}


@pytest.mark.parametrize(
  ("name", "arg", "value"), [(n, a, v) for n, bad in BAD.items() for a, v in bad]
)
def test_bad_argument_is_rejected_when_built(name, arg, value):
  with pytest.raises(ValueError, match=rf"^{arg} must be"):
    FACTORIES[name](**{arg: value})


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_edge_values_and_schedules_are_accepted(name):
  FACTORIES[name](p=0.0)
  FACTORIES[name](p=0.5)
  FACTORIES[name](p=padam_jax.anneal_p(10))
