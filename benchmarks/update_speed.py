"""Optimizer-step speed of Padam against Optax's and PyTorch's optimizers.

One jitted step (``tx.update`` then ``optax.apply_updates``, parameters and
state donated, as in a training loop) over a parameter tree shaped like a CIFAR
ResNet-18 and one shaped like a ~100M-parameter transformer, with fixed
gradients. Rows are interleaved: every round visits every optimizer in a
rotated order, builds its state (untimed), takes one untimed step and then
times ``--steps`` steps, so slow drifts of a shared machine hit all rows alike.
A first round is a warm-up (compilation) and is not timed.

Reported per row: median step time, its ratio to ``optax.amsgrad`` with the
same weight decay, its ratio to a data-movement floor (a jitted kernel that
reads and writes the same arrays as a Padam step with additions only) and the
optimizer state's bytes. For the JAX rows the compiled HLO is also summarised:
kernels per step, bytes they read and write, and transcendental operations per
element, which is where the time goes when a row misses its target.

Run from the repository root::

  python -m benchmarks.update_speed --out benchmarks/results/update_speed.md
  python -m benchmarks.update_speed --quick   # tiny trees, a smoke test
  python -m benchmarks.update_speed --no-torch --steps-per-call 50   # on an accelerator
  python -m benchmarks.update_speed --tree resnet18 --no-torch --rounds 15 \
    --rows "padam p=1/8" "padam p traced" "padam p=1/8, lr injected" "padam p=0.2" \
    "padam p=0.2 traced" "optax amsgrad" --out benchmarks/results/traced_p_speed.md
    # chosen rows only, a short table

``--steps-per-call K`` runs K steps in one jitted ``lax.fori_loop`` per timed call and reports
the time per step: on an accelerator a step of these trees takes less time than the Python call
that launches it, so one step per call would time the launch, not the step.

``--rows`` also offers rows the full table leaves out (``padam p=0.2``, a
``p`` without a square-root form, as a number and traced; ``padam p=1/8, lr injected``, Padam under
``optax.inject_hyperparams`` with ``p`` among its ``static_args``).

The PyTorch rows need PyTorch (``pip install -e ".[bench]"``); without it they are skipped and
the output says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import padam_jax
from padam_jax import _power

try:
  import torch
except ImportError:  # PyTorch is an optional benchmark dependency
  torch = None

Shapes = dict[str, tuple[int, ...]]

# The paper's CIFAR hyperparameters; the values do not change the work done.
PADAM_LR, P, ADAM_LR, SGD_LR, B1, B2, EPS = 0.1, 0.125, 1e-3, 0.1, 0.9, 0.999, 1e-8
WEIGHT_DECAY = 5e-4
LOAD_WARNING = 2.5  # load average above which timings on a 2-core machine are noisy


def resnet18_shapes(
  widths: tuple[int, ...] = (64, 128, 256, 512),
  blocks: tuple[int, ...] = (2, 2, 2, 2),
  in_channels: int = 3,
  classes: int = 10,
) -> Shapes:
  """Parameter shapes of the CIFAR ResNet-18 (3x3 stem, BasicBlocks, 1x1 shortcuts).

  Convolutions have no bias (BatchNorm follows each); kernels are HWIO.
  """
  shapes: Shapes = {}

  def conv_bn(name: str, size: int, cin: int, cout: int) -> None:
    shapes[f"{name}/kernel"] = (size, size, cin, cout)
    shapes[f"{name}/bn_scale"] = (cout,)
    shapes[f"{name}/bn_bias"] = (cout,)

  conv_bn("stem", 3, in_channels, widths[0])
  cin = widths[0]
  for stage, (width, count) in enumerate(zip(widths, blocks, strict=True)):
    for block in range(count):
      name = f"stage{stage + 1}/block{block + 1}"
      stride = 2 if stage > 0 and block == 0 else 1
      conv_bn(f"{name}/conv1", 3, cin, width)
      conv_bn(f"{name}/conv2", 3, width, width)
      if stride != 1 or cin != width:
        conv_bn(f"{name}/shortcut", 1, cin, width)
      cin = width
  shapes["head/kernel"] = (cin, classes)
  shapes["head/bias"] = (classes,)
  return shapes


def transformer_shapes(
  layers: int = 12, width: int = 768, vocab: int = 16_384, context: int = 1024, mlp: int = 4
) -> Shapes:
  """Parameter shapes of a GPT-2-style decoder with tied embeddings (98.4M by default)."""
  shapes: Shapes = {"embed/tokens": (vocab, width), "embed/positions": (context, width)}
  for layer in range(layers):
    name = f"layer{layer + 1}"
    for norm in ("ln1", "ln2"):
      shapes[f"{name}/{norm}/scale"] = (width,)
      shapes[f"{name}/{norm}/bias"] = (width,)
    shapes[f"{name}/attn/qkv/kernel"] = (width, 3 * width)
    shapes[f"{name}/attn/qkv/bias"] = (3 * width,)
    shapes[f"{name}/attn/out/kernel"] = (width, width)
    shapes[f"{name}/attn/out/bias"] = (width,)
    shapes[f"{name}/mlp/in/kernel"] = (width, mlp * width)
    shapes[f"{name}/mlp/in/bias"] = (mlp * width,)
    shapes[f"{name}/mlp/out/kernel"] = (mlp * width, width)
    shapes[f"{name}/mlp/out/bias"] = (width,)
  shapes["final_ln/scale"] = (width,)
  shapes["final_ln/bias"] = (width,)
  return shapes


def tree_bytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


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
  hlo: str = ""
  temp_bytes: int = 0  # the step's scratch memory, allocated at every call
  extra: bool = False  # timed only when named by --rows


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
  ``state_arrays``; with ``analyse``, also the compiled step's HLO text and scratch memory (one more
  compilation per JAX row).
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
        if row.kind != "torch" and analyse:
          compiled = runner.compiled()
          row.hlo = compiled.as_text()
          memory = compiled.memory_analysis()
          row.temp_bytes = memory.temp_size_in_bytes if memory is not None else 0
      else:
        per_call = getattr(runner, "steps_per_call", 1)
        for _ in range(steps):
          start = time.perf_counter()
          runner.step()
          row.times.append((time.perf_counter() - start) / per_call)
      runner.teardown()
    log(f"  {bench.name}: round {r}/{rounds} done, load {os.getloadavg()[0]:.2f}")


_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^=]*?\)|\S+)\s+([a-z][\w-]*)\((.*)$"
)
_ARRAY = re.compile(r"(pred|bf16|f16|f32|f64|s8|s32|s64|u8|u32|u64)\[([\d,]*)\]")
_ITEMSIZE = {
  "pred": 1,
  "bf16": 2,
  "f16": 2,
  "f32": 4,
  "f64": 8,
  "s8": 1,
  "s32": 4,
  "s64": 8,
  "u8": 1,
  "u32": 4,
  "u64": 8,
}
TRANSCENDENTALS = ("sqrt", "rsqrt", "divide", "power", "exponential", "log")


def shape_bytes(shape: str, min_elements: int = 2) -> int:
  """Bytes of the arrays in an HLO shape string; scalars and tiny arrays excluded."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    n = math.prod(int(d) for d in dims.split(",") if d)
    if n >= min_elements:
      total += n * _ITEMSIZE[dtype]
  return total


def hlo_summary(text: str) -> dict[str, float]:
  """Kernels in the entry computation, bytes they read and write, ops per element."""
  shapes: dict[str, str] = {}
  ops = dict.fromkeys(TRANSCENDENTALS, 0.0)
  kernels, read, written = 0, 0, 0
  in_entry = False
  for line in text.splitlines():
    if line.startswith("ENTRY"):
      in_entry = True
      continue
    if line.startswith("}"):
      in_entry = False
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode, rest = match.groups()
    shapes[name] = shape
    elements = sum(
      math.prod(int(d) for d in dims.split(",") if d) for _, dims in _ARRAY.findall(shape)
    )
    if opcode in ops and elements > 1:
      ops[opcode] += elements
    if in_entry and opcode not in (
      "parameter",
      "tuple",
      "get-tuple-element",
      "constant",
      "bitcast",
    ):
      out = shape_bytes(shape)
      if out:
        kernels += 1
        written += out
        operands = re.findall(r"%([\w.\-]+)", rest.split("),")[0])
        read += sum(shape_bytes(shapes.get(o, "")) for o in operands)
  return {"kernels": kernels, "read": read, "written": written, **ops}


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


def fmt_ratio(x: float | None) -> str:
  return "-" if x is None else f"{x:.2f}x"


def render(
  benches: list[tuple[Bench, list[Row]]],
  header: dict[str, str],
  targets_for,
  forms: list[tuple[str, float]],
) -> str:
  out = ["# Optimizer update-step speed", ""]
  out += [f"- {k}: {v}" for k, v in header.items()]
  out += [
    "",
    "## Arithmetic of the denominator forms",
    "",
    "Nanoseconds per element on one core, the array in cache (a jitted loop over 16,384 "
    "elements, best of repeats, loop overhead subtracted): the compute each form adds to a "
    "step when memory bandwidth does not hide it.",
    "",
    "| form | ns / element |",
    "|---|---|",
    *[f"| {name} | {ns:.2f} |" for name, ns in forms],
    "",
  ]
  for bench, rows in benches:
    med = {(r.name, r.weight_decay): statistics.median(r.times) for r in rows}
    floor = med[("floor (adds only)", 0.0)]
    param_bytes = tree_bytes(bench.params)
    out += [
      f"## {bench.name}: {bench.size:,} parameters in {len(bench.shapes)} arrays "
      f"({param_bytes / 1e6:.1f} MB float32)",
      "",
      "| optimizer | weight decay | median ms | IQR ms | vs optax amsgrad | vs floor "
      "| state MB | state / params |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
      base_name = "optax amsgrad" if r.weight_decay == 0 else "optax amsgrad + L2"
      base = med[(base_name, r.weight_decay)]
      q = statistics.quantiles(r.times, n=4)
      state = "-" if r.kind == "floor" else f"{r.state_bytes / 1e6:.1f}"
      ratio = "-" if r.kind == "floor" else f"{r.state_bytes / param_bytes:.3f}"
      out.append(
        f"| {r.name} | {r.weight_decay:g} | {med[(r.name, r.weight_decay)] * 1e3:.1f} "
        f"| {q[0] * 1e3:.1f}-{q[2] * 1e3:.1f} | {fmt_ratio(med[(r.name, r.weight_decay)] / base)} "
        f"| {fmt_ratio(med[(r.name, r.weight_decay)] / floor)} | {state} | {ratio} |"
      )
    floor_row = next(r for r in rows if r.kind == "floor")
    moved = 9 * param_bytes  # reads g, x, m, v, vhat; writes x, m, v, vhat
    out += [
      "",
      f"The floor moves {moved / 1e6:.0f} MB (5 arrays read, 4 written) in {floor * 1e3:.1f} ms: "
      f"{moved / floor / 1e9:.1f} GB/s. Ratios use medians of {len(floor_row.times)} timed "
      "steps per row; weight-decay rows are compared with `optax amsgrad + L2` "
      "(`add_decayed_weights` chained before `amsgrad`, the same coupled decay).",
      "",
      "Compiled HLO of each JAX step (XLA:CPU): kernels launched, bytes they read and write "
      "(x the parameter bytes), and elementwise transcendental operations per parameter.",
      "",
      "| optimizer | weight decay | kernels | read | written | "
      + " | ".join(TRANSCENDENTALS)
      + " |",
      "|---|---|---|---|---|" + "---|" * len(TRANSCENDENTALS),
    ]
    for r in rows:
      if not r.hlo:
        continue
      s = hlo_summary(r.hlo)
      per = [f"{s[k] / bench.size:.2f}" for k in TRANSCENDENTALS]
      out.append(
        f"| {r.name} | {r.weight_decay:g} | {s['kernels']} | {s['read'] / param_bytes:.2f}x "
        f"| {s['written'] / param_bytes:.2f}x | " + " | ".join(per) + " |"
      )
    out += ["", "Targets:", ""]
    out += [f"- {line}" for line in targets_for(bench, rows, med, floor, param_bytes)]
    out.append("")
  return "\n".join(out)


def render_rows(benches: list[tuple[Bench, list[Row]]], header: dict[str, str]) -> str:
  """The table of the rows chosen with ``--rows``: times, ratios and the step's scratch memory."""
  out = ["# Optimizer update-step speed: chosen rows", ""]
  out += [f"- {k}: {v}" for k, v in header.items()]
  for bench, rows in benches:
    med = {r.name: statistics.median(r.times) for r in rows}
    first = rows[0].name
    base = "optax amsgrad" if "optax amsgrad" in med else first
    param_bytes = tree_bytes(bench.params)
    out += [
      "",
      f"## {bench.name}: {bench.size:,} parameters in {len(bench.shapes)} arrays "
      f"({param_bytes / 1e6:.1f} MB float32)",
      "",
      f"| optimizer | weight decay | median ms | IQR ms | vs {first} | vs {base} | scratch MB |",
      "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
      q = statistics.quantiles(r.times, n=4)
      out.append(
        f"| {r.name} | {r.weight_decay:g} | {med[r.name] * 1e3:.1f} "
        f"| {q[0] * 1e3:.1f}-{q[2] * 1e3:.1f} | {med[r.name] / med[first]:.2f}x "
        f"| {med[r.name] / med[base]:.2f}x | {r.temp_bytes / 1e6:.1f} |"
      )
    out += [
      "",
      f"Medians of {len(rows[0].times)} timed steps per row. Scratch: the compiled "
      "step's temporary buffers (XLA's memory analysis), allocated at every call.",
    ]
    if "padam p=1/8" in med and "padam p traced" in med:
      ratio = med["padam p traced"] / med["padam p=1/8"]
      out += [
        "",
        f"- padam p traced vs padam p=1/8: {ratio:.2f}x (target <= 1.05x): "
        f"{'met' if ratio <= 1.05 else 'MISSED'}",
      ]
  out.append("")
  return "\n".join(out)


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


def targets(bench: Bench, rows: list[Row], med, floor: float, param_bytes: int) -> list[str]:
  del bench
  padam, traced = med[("padam p=1/8", 0.0)], med[("padam p traced", 0.0)]
  amsgrad = med[("optax amsgrad", 0.0)]

  def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"

  lines = [
    f"padam p=1/8 vs optax amsgrad: {padam / amsgrad:.2f}x (target <= 1.0x): "
    f"{verdict(padam / amsgrad <= 1.0)}",
    f"padam p=1/8 vs floor: {padam / floor:.2f}x (target <= 1.15x): "
    f"{verdict(padam / floor <= 1.15)}",
    f"padam p=1/8 with weight decay vs optax amsgrad + L2: "
    f"{med[('padam p=1/8', WEIGHT_DECAY)] / med[('optax amsgrad + L2', WEIGHT_DECAY)]:.2f}x",
    f"padam p traced vs optax amsgrad: {traced / amsgrad:.2f}x (target <= 1.6x): "
    f"{verdict(traced / amsgrad <= 1.6)}",
  ]
  for decay in (0.0, WEIGHT_DECAY):
    key = ("torch Padam (reference rule)", decay)
    if key in med:
      speedup = med[key] / med[("padam p=1/8", decay)]
      lines.append(
        f"reference-rule torch Padam / padam p=1/8 (weight decay {decay:g}): {speedup:.2f}x "
        f"faster (target >= 3x): {verdict(speedup >= 3)}"
      )
  for r in rows:
    if r.name.startswith("padam") and r.kind == "jax":
      lines.append(
        f"state of {r.name} (weight decay {r.weight_decay:g}): {r.state_arrays:g} arrays per "
        f"parameter, {r.state_bytes:,} bytes = {r.state_bytes / param_bytes:.4f} x the "
        "parameters' bytes (the excess is the step count and injected scalars)"
      )
  return lines


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown"


def torch_rows(no_torch: bool) -> tuple[bool, str]:
  """Whether the PyTorch rows run, and what the output says of PyTorch."""
  if torch is None:
    return False, 'PyTorch rows skipped: torch not installed (pip install -e ".[bench]")'
  if no_torch:
    return False, "PyTorch rows skipped (--no-torch)"
  return True, f"torch {torch.__version__} ({torch.get_num_threads()} threads)"


def trees(which: str = "all", quick: bool = False) -> list[tuple[str, str, Shapes]]:
  """The parameter trees to time, by name: ``"resnet18"``, ``"transformer"`` or ``"all"``.

  Args:
    which: the tree, or ``"all"`` for both.
    quick: scaled-down trees of the same layout (ResNet widths /8; 2 transformer layers of
      width 64), for a smoke test.

  Returns:
    (key, heading, shapes) per tree, the ResNet-18 first.
  """
  if quick:
    found = [
      ("resnet18", "ResNet-18-shaped (quick: widths /8)", resnet18_shapes(widths=(8, 16, 32, 64))),
      (
        "transformer",
        "Transformer-shaped (quick: 2 layers, width 64)",
        transformer_shapes(layers=2, width=64, vocab=512, context=64),
      ),
    ]
  else:
    found = [
      ("resnet18", "ResNet-18-shaped (CIFAR)", resnet18_shapes()),
      (
        "transformer",
        "Transformer-shaped (12 layers, width 768, vocab 16384)",
        transformer_shapes(),
      ),
    ]
  return [tree for tree in found if which in ("all", tree[0])]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.update_speed", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--quick", action="store_true", help="tiny trees and few repeats")
  parser.add_argument("--out", default=None, help="markdown file to write (default: stdout only)")
  parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7, quick 2)")
  parser.add_argument("--steps", type=int, default=3, help="timed calls per row per round")
  parser.add_argument(
    "--steps-per-call",
    type=int,
    default=1,
    help="optimizer steps per timed call of a JAX row, in a jitted loop (on an accelerator, "
    "enough that a call takes well over its launch)",
  )
  parser.add_argument(
    "--no-torch",
    action="store_true",
    help="skip the PyTorch rows (skipped anyway when PyTorch is not installed)",
  )
  parser.add_argument(
    "--tree",
    choices=("all", "resnet18", "transformer"),
    default="all",
    help="which parameter tree(s) to time",
  )
  parser.add_argument(
    "--rows",
    nargs="+",
    metavar="NAME",
    default=None,
    help='time only these rows, by name (e.g. "padam p traced"), and write a short table of them',
  )
  args = parser.parse_args(argv)
  rounds = args.rounds or (2 if args.quick else 7)
  with_torch, torch_note = torch_rows(args.no_torch)

  def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

  if not with_torch:
    log(torch_note)
  load_start = os.getloadavg()
  if args.steps_per_call < 1:
    parser.error(f"--steps-per-call must be >= 1, got {args.steps_per_call}")
  results = []
  for _, name, shapes in trees(args.tree, args.quick):
    log(f"{name}: building")
    bench = Bench.build(name, shapes, with_torch, args.steps_per_call)
    # The per-parameter PyTorch loop takes seconds a step on the large tree: its
    # weight-decay row is timed on the ResNet tree only, to keep a run short.
    decays = (0.0, WEIGHT_DECAY) if not results else (0.0,)
    rows = choose_rows(make_rows(with_torch, decays), args.rows)
    measure(bench, rows, rounds, args.steps, log)
    results.append((bench, rows))
    del bench  # the next tree's arrays replace this one's
  if not args.rows:
    log("power forms")
    forms = power_forms(repeats=3 if args.quick else 9)
  load_end = os.getloadavg()

  command = shlex.join(["python", *sys.orig_argv[1:]])
  loads = (
    f"{', '.join(f'{x:.2f}' for x in load_start)} at start, "
    f"{', '.join(f'{x:.2f}' for x in load_end)} at end (1, 5, 15 min)"
  )
  if max(load_start[0], load_end[0], load_end[1]) >= LOAD_WARNING:
    loads += f" - above {LOAD_WARNING}: other work shared the CPU, treat ratios as noisy"
  header = {
    "command": f"`{command}`",
    "machine": f"{cpu_model()}, {os.cpu_count()} cores, {jax.devices()[0].platform} backend",
    "load average": loads,
    "versions": f"jax {jax.__version__}, optax {optax.__version__}, padam_jax "
    f"{padam_jax.__version__}, {torch_note}",
    "method": f"{rounds} interleaved rounds x {args.steps} timed steps per row after an untimed "
    "warm-up round; each visit builds the state, takes one untimed step, then times "
    "steps (update + apply_updates, parameters and state donated)",
  }
  if args.steps_per_call > 1:
    header["method"] += (
      f"; each timed call of a JAX row runs {args.steps_per_call} steps in a jitted "
      "lax.fori_loop, its time divided by them"
    )
  text = render_rows(results, header) if args.rows else render(results, header, targets, forms)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
