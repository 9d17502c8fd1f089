"""Timing one optimizer step: the tree under test, the rows (optimizers) and the interleaved rounds.

:class:`Bench` holds a tree's parameters and fixed gradients (and PyTorch copies), each
:class:`Row` an optimizer and how to build its runner (:class:`JaxRunner`: one jitted, donating
step or ``lax.fori_loop`` of steps; the PyTorch runners; the data-movement floor of
:func:`floor_transformation`), and :func:`measure` times rows in interleaved rounds, keeping the
compiled HLO of the very function it times for :mod:`benchmarks.hlo_counts`. :func:`power_forms`
times the denominator's forms alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import padam_jax
from benchmarks.param_trees import Shapes, tree_bytes
from padam_jax import _power

try:
  import torch
except ImportError:  # PyTorch is an optional benchmark dependency
  torch = None


# The paper's CIFAR hyperparameters; the values do not change the work done.
PADAM_LR, P, ADAM_LR, SGD_LR, B1, B2, EPS = 0.1, 0.125, 1e-3, 0.1, 0.9, 0.999, 1e-8
WEIGHT_DECAY = 5e-4


@dataclasses.dataclass
class Bench:
  """The tree under test: JAX parameters and gradients, and PyTorch copies.

  Attributes:
    steps_per_call: optimizer steps one timed call of a JAX row runs (in a ``lax.fori_loop``); its
      time is divided by them.
  """

  name: str
  shapes: Shapes
  params: dict[str, jax.Array]
  grads: dict[str, jax.Array]
  torch_params: list[Any] | None
  steps_per_call: int = 1

  @property
  def size(self) -> int:
    return sum(int(np.prod(s)) for s in self.shapes.values())

  @classmethod
  def build(cls, name: str, shapes: Shapes, with_torch: bool, steps_per_call: int = 1) -> Bench:
    rng = np.random.default_rng(0)
    params, grads, torch_params = {}, {}, [] if with_torch else None
    for key, shape in shapes.items():
      x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
      g = rng.standard_normal(shape, dtype=np.float32) * np.float32(1e-3)
      params[key], grads[key] = jnp.asarray(x), jnp.asarray(g)
      if torch_params is not None:
        tensor = torch.nn.Parameter(torch.from_numpy(x))
        tensor.grad = torch.from_numpy(g)
        torch_params.append(tensor)
    return cls(name, shapes, params, grads, torch_params, steps_per_call)


class JaxRunner:
  """One jitted, donating training-loop step of an Optax transformation.

  With ``bench.steps_per_call`` above 1, a call runs that many steps in a ``lax.fori_loop`` (the
  same gradients each step), so the launch of the call is paid once for all of them.
  """

  def __init__(self, bench: Bench, tx: optax.GradientTransformation):
    self.bench = bench
    self.init = jax.jit(tx.init)
    self.steps_per_call = bench.steps_per_call

    def step(grads, params, state):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    def steps(grads, params, state):
      body = lambda _, carry: step(grads, *carry)  # noqa: E731
      return jax.lax.fori_loop(0, self.steps_per_call, body, (params, state))

    self.step_fn = jax.jit(step if self.steps_per_call == 1 else steps, donate_argnums=(1, 2))
    self.state = None

  def setup(self) -> None:
    self.state = jax.block_until_ready(self.init(self.bench.params))

  def step(self) -> None:
    params, self.state = self.step_fn(self.bench.grads, self.bench.params, self.state)
    self.bench.params = jax.block_until_ready(params)

  def state_bytes(self) -> int:
    return tree_bytes(self.state)

  def compiled(self) -> Any:
    return self.step_fn.lower(self.bench.grads, self.bench.params, self.state).compile()

  def teardown(self) -> None:
    self.state = None


def floor_transformation() -> optax.GradientTransformation:
  """Moves Padam's bytes with additions only: reads g, m, v, vhat, x; writes m, v, vhat, x."""

  def init_fn(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
    return (zeros(), zeros(), zeros())

  def update_fn(updates, state, params=None):
    del params
    m, v, vhat = (jax.tree.map(jnp.add, s, updates) for s in state)
    return m, (m, v, vhat)

  return optax.GradientTransformation(init_fn, update_fn)


class TorchPadamRunner:
  """The reference Padam rule in PyTorch, one Python-level update per parameter.

  Written from the formula: g += wd x; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
  vhat = max(vhat, v); x -= lr sqrt(1-b2^t)/(1-b1^t) m / (sqrt(vhat) + eps)^(2p).
  """

  def __init__(self, bench: Bench, weight_decay: float):
    self.params = bench.torch_params
    self.weight_decay = weight_decay
    self.state: list[tuple[Any, Any, Any]] = []
    self.t = 0

  def setup(self) -> None:
    self.state = [tuple(torch.zeros_like(x) for _ in range(3)) for x in self.params]
    self.t = 0

  def step(self) -> None:
    self.t += 1
    step_size = PADAM_LR * math.sqrt(1 - B2**self.t) / (1 - B1**self.t)
    # A context rather than a decorator: the class must be definable without PyTorch.
    with torch.no_grad():
      for x, (m, v, vhat) in zip(self.params, self.state, strict=True):
        g = x.grad
        if self.weight_decay:
          g = g.add(x, alpha=self.weight_decay)
        m.mul_(B1).add_(g, alpha=1 - B1)
        v.mul_(B2).addcmul_(g, g, value=1 - B2)
        torch.maximum(vhat, v, out=vhat)
        denom = vhat.sqrt().add_(EPS).pow_(2 * P)
        x.addcdiv_(m, denom, value=-step_size)

  def state_bytes(self) -> int:
    return sum(t.numel() * t.element_size() for s in self.state for t in s)

  def teardown(self) -> None:
    self.state = []


class TorchAdamRunner:
  """``torch.optim.Adam(amsgrad=True, fused=True)``: one fused kernel over all tensors."""

  def __init__(self, bench: Bench, weight_decay: float):
    self.params = bench.torch_params
    self.weight_decay = weight_decay
    self.opt = None

  def setup(self) -> None:
    self.opt = torch.optim.Adam(
      self.params,
      lr=ADAM_LR,
      betas=(B1, B2),
      eps=EPS,
      weight_decay=self.weight_decay,
      amsgrad=True,
      fused=True,
    )

  def step(self) -> None:
    self.opt.step()

  def state_bytes(self) -> int:
    return sum(
      t.numel() * t.element_size()
      for s in self.opt.state.values()
      for t in s.values()
      if torch.is_tensor(t)
    )

  def teardown(self) -> None:
    self.opt = None


@dataclasses.dataclass
class Row:
  name: str
  weight_decay: float
  make: Callable[[Bench], Any]
  kind: str = "jax"  # "jax", "floor" or "torch"
  times: list[float] = dataclasses.field(default_factory=list)
  state_bytes: int = 0
  state_arrays: float = 0.0  # non-scalar state arrays per parameter array
  state_array_bytes: int = 0  # the bytes of those arrays (narrower than the parameters' or not)
  hlo: str = ""
  temp_bytes: int = 0  # the step's scratch memory, allocated at every call
  bytes_accessed: float = 0.0  # the cost model's bytes read and written by one compiled call
  extra: bool = False  # timed only when named by --rows


BF16 = jnp.bfloat16


def make_rows(with_torch: bool, torch_decays: tuple[float, ...]) -> list[Row]:
  wd = WEIGHT_DECAY
  # Only p is injected: injecting weight_decay too would keep its (zero) term in
  # the traced step, two more reads of the parameters.
  traced = optax.inject_hyperparams(
    padam_jax.padam, static_args=("learning_rate", "b1", "b2", "eps", "weight_decay", "mask")
  )

  # The learning rate injected (to read or change it), p and the rest kept as numbers.
  lr_injected = optax.inject_hyperparams(
    padam_jax.padam, static_args=("p", "b1", "b2", "eps", "weight_decay", "mask")
  )

  def amsgrad(weight_decay):
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.amsgrad(ADAM_LR, B1, B2, EPS))

  rows = [
    Row("padam p=1/8", 0.0, lambda b: JaxRunner(b, padam_jax.padam(PADAM_LR, p=P))),
    Row("padam p traced", 0.0, lambda b: JaxRunner(b, traced(learning_rate=PADAM_LR, p=P))),
    Row(
      "padam p=1/8 mu bf16",
      0.0,
      lambda b: JaxRunner(b, padam_jax.padam(PADAM_LR, p=P, mu_dtype=jnp.bfloat16)),
    ),
    Row("optax sgd momentum 0.9", 0.0, lambda b: JaxRunner(b, optax.sgd(SGD_LR, momentum=0.9))),
    Row("optax adam", 0.0, lambda b: JaxRunner(b, optax.adam(ADAM_LR, B1, B2, EPS))),
    Row("optax amsgrad", 0.0, lambda b: JaxRunner(b, optax.amsgrad(ADAM_LR, B1, B2, EPS))),
    Row("floor (adds only)", 0.0, lambda b: JaxRunner(b, floor_transformation()), kind="floor"),
    Row("padam p=1/8", wd, lambda b: JaxRunner(b, padam_jax.padam(PADAM_LR, p=P, weight_decay=wd))),
    Row("optax amsgrad + L2", wd, lambda b: JaxRunner(b, amsgrad(wd))),
    Row("padam p=0.2", 0.0, lambda b: JaxRunner(b, padam_jax.padam(PADAM_LR, p=0.2)), extra=True),
    Row(
      "padam p=1/8, lr injected",
      0.0,
      lambda b: JaxRunner(b, lr_injected(learning_rate=PADAM_LR, p=P)),
      extra=True,
    ),
    Row(
      "padam p=0.2 traced",
      0.0,
      lambda b: JaxRunner(b, traced(learning_rate=PADAM_LR, p=0.2)),
      extra=True,
    ),
    # The state kept narrow: every moment in bfloat16 (rounded stochastically), or in 8-bit codes.
    Row(
      "padam p=1/8, bf16 state",
      0.0,
      lambda b: JaxRunner(b, padam_jax.padam(PADAM_LR, p=P, mu_dtype=BF16, nu_dtype=BF16)),
      extra=True,
    ),
    Row(
      "padam p=1/8, 8-bit state",
      0.0,
      lambda b: JaxRunner(b, padam_jax.with_quantized_state(padam_jax.padam(PADAM_LR, p=P))),
      extra=True,
    ),
    Row(
      "optax adam, 8-bit state",
      0.0,
      lambda b: JaxRunner(b, padam_jax.with_quantized_state(optax.adam(ADAM_LR, B1, B2, EPS))),
      extra=True,
    ),
  ]
  if with_torch:
    for decay in torch_decays:
      rows.append(
        Row(
          "torch Padam (reference rule)",
          decay,
          lambda b, d=decay: TorchPadamRunner(b, d),
          kind="torch",
        )
      )
      rows.append(
        Row(
          "torch Adam(amsgrad, fused)",
          decay,
          lambda b, d=decay: TorchAdamRunner(b, d),
          kind="torch",
        )
      )
  return rows


def measure(
  bench: Bench, rows: list[Row], rounds: int, steps: int, log, analyse: bool = True
) -> None:
  """Times ``rows`` on ``bench``: ``rounds`` interleaved rounds of ``steps`` timed calls per row.

  Fills in each row's ``times`` (seconds per optimizer step), ``state_bytes`` and
  ``state_arrays``; with ``analyse``, also the compiled step's HLO text, scratch memory and the
  cost model's bytes accessed (one more compilation per JAX row).
  """
  runners = [row.make(bench) for row in rows]
  for r in range(rounds + 1):  # round 0 compiles and warms up, untimed
    order = [(i + r) % len(rows) for i in range(len(rows))]
    for i in order:
      row, runner = rows[i], runners[i]
      runner.setup()
      runner.step()
      if r == 0:
        row.state_bytes = runner.state_bytes()
        if row.kind != "torch":
          arrays = [x for x in jax.tree.leaves(runner.state) if x.ndim > 0]
          row.state_arrays = len(arrays) / len(bench.shapes)
          row.state_array_bytes = sum(x.size * x.dtype.itemsize for x in arrays)
        if row.kind != "torch" and analyse:
          compiled = runner.compiled()
          row.hlo = compiled.as_text()
          memory = compiled.memory_analysis()
          row.temp_bytes = memory.temp_size_in_bytes if memory is not None else 0
          cost = compiled.cost_analysis()
          cost = (cost[0] if isinstance(cost, list) else cost) or {}
          row.bytes_accessed = float(cost.get("bytes accessed", 0.0))
      else:
        per_call = getattr(runner, "steps_per_call", 1)
        for _ in range(steps):
          start = time.perf_counter()
          runner.step()
          row.times.append((time.perf_counter() - start) / per_call)
      runner.teardown()
    log(f"  {bench.name}: round {r}/{rounds} done, load {os.getloadavg()[0]:.2f}")


def choose_rows(rows: list[Row], names: list[str] | None) -> list[Row]:
  """The default rows, or those named (at weight decay 0 where a name has both), in that order."""
  if not names:
    return [r for r in rows if not r.extra]
  chosen = []
  for name in names:
    matches = sorted((r for r in rows if r.name == name), key=lambda r: r.weight_decay != 0)
    if not matches:
      raise SystemExit(f"no row named {name!r}; rows: {sorted({r.name for r in rows})}")
    chosen.append(matches[0])
  return chosen


def torch_rows(no_torch: bool) -> tuple[bool, str]:
  """Whether the PyTorch rows run, and what the output says of PyTorch."""
  if torch is None:
    return False, 'PyTorch rows skipped: torch not installed (pip install -e ".[bench]")'
  if no_torch:
    return False, "PyTorch rows skipped (--no-torch)"
  return True, f"torch {torch.__version__} ({torch.get_num_threads()} threads)"


def power_forms(repeats: int) -> list[tuple[str, float]]:
  """Nanoseconds per element, on one core, of each denominator form.

  A jitted loop applies the form to a cache-resident array (so memory traffic
  does not hide the arithmetic); the loop's own bookkeeping is subtracted.
  """
  x = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.25, 1 << 14).astype(np.float32))
  q = jnp.float32(2 * P)
  forms = {
    "loop only": lambda v, q: v,
    "optax amsgrad: 1 / (sqrt(v) + eps)": lambda v, q: 1 / (jnp.sqrt(v) + EPS),
    "padam p=1/8, p a number: square-root chain": lambda v, q: _power.inverse_power(
      jnp.sqrt(v) + EPS, 2 * P
    ),
    "padam p=0.2, p a number: reduced exp/log": lambda v, q: _power.inverse_power(
      jnp.sqrt(v) + EPS, 0.4
    ),
    "padam p traced: reduced exp/log": lambda v, q: _power.inverse_power(jnp.sqrt(v) + EPS, q),
    "jnp.power(sqrt(v) + eps, -2p), p traced": lambda v, q: jnp.power(jnp.sqrt(v) + EPS, -q),
  }
  iterations = 500
  results = []
  for name, form in forms.items():

    def loop(v, q, form=form):
      return jax.lax.fori_loop(0, iterations, lambda i, y: form(y, q) * 0.5 + 0.75, v)

    fn = jax.jit(loop)
    fn(x, q).block_until_ready()
    best = math.inf
    for _ in range(repeats):
      start = time.perf_counter()
      fn(x, q).block_until_ready()
      best = min(best, time.perf_counter() - start)
    results.append((name, best / iterations / x.size * 1e9))
  base = results[0][1]
  return [(name, ns - base) for name, ns in results[1:]]
