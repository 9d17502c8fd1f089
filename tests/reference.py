"""Independent NumPy implementations of the update rules, written from the formulas.

Nothing here calls padam_jax: these loops are what the library is checked against.
"""

from __future__ import annotations

import numpy as np

SHAPES = {"a": (3, 4), "b": (7,), "c": (2, 3, 5)}
SCALES = {"a": 1e-4, "b": 1.0, "c": 1e2}


def mixed_scale_gradients(steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """Random float32 gradients spanning six orders of magnitude, with exact zeros.

  Each leaf has its own scale, each element a log-normal spread on top of it,
  a fifth of the entries are exactly zero at every step, and the first entry of
  every leaf is zero at every step (its second moment stays exactly 0).
  """
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    step = {}
    for name, shape in SHAPES.items():
      g = SCALES[name] * rng.standard_normal(shape) * np.exp(rng.normal(0.0, 1.0, shape))
      g[rng.random(shape) < 0.2] = 0.0
      g.flat[0] = 0.0
      step[name] = g.astype(np.float32)
    out.append(step)
  return out


def initial_params(seed: int = 1) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


class PadamReference:
  """The authors' reference rule (docs/update-rule.md) in float64, one leaf at a time.

  x <- x - lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(vhat) + eps)^(2p), with the
  gradient g + wd * x (coupled L2) and vhat the running max of the raw v.
  ``bias_correction=False, eps=0`` is the paper's Algorithm 1, x - lr * m / vhat^p,
  with 0/0 (a coordinate that never had a gradient) taken as 0.
  """

  def __init__(self, p, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, bias_correction=True):
    self.p, self.b1, self.b2, self.eps, self.wd = p, b1, b2, eps, wd
    self.bias_correction = bias_correction
    self.t = 0
    self.m = self.v = self.vhat = None

  def update(self, g, x, lr, decay=True):
    """Returns the additive update for gradient ``g`` at params ``x``."""
    g = np.asarray(g, np.float64)
    x = np.asarray(x, np.float64)
    if self.m is None:
      self.m, self.v, self.vhat = np.zeros_like(g), np.zeros_like(g), np.zeros_like(g)
    self.t += 1
    if decay and self.wd:
      g = g + self.wd * x
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g**2
    self.vhat = np.maximum(self.vhat, self.v)
    c = np.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t) if self.bias_correction else 1.0
    denom = (np.sqrt(self.vhat) + self.eps) ** (2 * self.p)
    with np.errstate(divide="ignore", invalid="ignore"):
      ratio = np.where(denom == 0, 0.0, self.m / denom)
    return -lr * c * ratio


def relative_deviation(actual, expected, floor_fraction=1e-3):
  """max |actual - expected| / (|expected| + floor), floor a fraction of the leaf's max |expected|.

  The floor keeps coordinates whose update is (nearly) zero by cancellation from
  dividing round-off by zero.
  """
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  floor = floor_fraction * np.max(np.abs(expected)) + np.finfo(np.float64).tiny
  return float(np.max(np.abs(actual - expected) / (np.abs(expected) + floor)))
