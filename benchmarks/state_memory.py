"""Padam's state: its memory per device and per parameter, and its update's error when kept narrow.

    python -m benchmarks.state_memory [--fsdp 2 4 8]

Computed from the arrays' shapes alone (nothing is allocated, no device is needed): the parameters
of a model and the state of Padam for them come from ``jax.eval_shape``, and every array is laid
out by the trainers' own rule, :func:`examples.training.fsdp_spec` (an array of at least
``FSDP_MIN_SIZE`` elements is split into K equal parts along its largest dimension that K divides;
a smaller one is whole on every device). The bytes are those ``run.json`` reports for a run
(``param_bytes``, ``optimizer_state_bytes`` and their ``*_per_device``): the tests check that the
two agree for a run on ``--mesh data=2,fsdp=4``.

The models: the CIFAR-10 trainer's ResNet-18 with the registry's Padam for ``cifar10`` (as
``python -m examples.cifar10 --model resnet18`` trains it), and the ~100M-parameter GPT-2-style
parameter tree of ``benchmarks/update_speed.py`` with ``padam_jax.padam``. Padam keeps three
float32 arrays per parameter (``mu``, ``nu``, ``nu_max``), 12 bytes per parameter, plus a few
counters. Prints Markdown tables:

- memory per device, replicated and split over ``fsdp``;
- bytes of Padam's state per parameter in float32, with ``mu_dtype`` and ``nu_dtype`` bfloat16, and
  kept in 8 bits by :func:`padam_jax.with_quantized_state` (blocks of 16, 32 and 64), with the
  quantized leaves whose blocks would straddle two devices in the trainers' layout;
- the relative error of Padam's update when its state is stored narrow: the same random gradients
  (a (16, 256) leaf whose coordinates' scales spread over four decades, a fixed mean plus unit
  noise per step) are replayed for ``PRECISION_STEPS`` steps through Padam in float32 and through
  each way of storing its state, and the updates of the last 100 steps are compared (about half
  a minute on a CPU).
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from flax import nnx

import padam_jax
from examples import optimizers, training
from examples.cifar10 import models
from padam_jax import _quantized
from padam_jax._rounding import random_bits, uniform

MIB = 2**20


def tree_memory(tree: Any, fsdp: int) -> tuple[int, int]:
  """The bytes of the arrays of ``tree`` (arrays or ``jax.ShapeDtypeStruct``): whole, and on each
  device of a mesh whose fsdp axis has ``fsdp`` devices (:func:`examples.training.fsdp_spec`)."""
  whole = per_device = 0
  for x in jax.tree.leaves(tree):
    size = math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    split = any(axis is not None for axis in training.fsdp_spec(x.shape, fsdp))
    whole += size
    per_device += size // fsdp if split else size
  return whole, per_device


def memory(params: Any, optimizer_state: Any, fsdp: int) -> dict[str, int]:
  """The entries of run.json for these parameters and optimizer state on ``fsdp`` devices."""
  param_bytes, param_per_device = tree_memory(params, fsdp)
  state_bytes, state_per_device = tree_memory(optimizer_state, fsdp)
  return {
    "param_bytes": param_bytes,
    "param_bytes_per_device": param_per_device,
    "optimizer_state_bytes": state_bytes,
    "optimizer_state_bytes_per_device": state_per_device,
  }


def nnx_state(create_model: Callable[[], nnx.Module], tx: Any) -> tuple[Any, Any]:
  """The abstract parameters of a Flax NNX model and the state of an ``nnx.Optimizer`` for them,
  as the trainers hold them (the optimizer state with its step counter)."""

  def create():
    model = create_model()
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  model, optimizer = nnx.eval_shape(create)
  # The optimizer as the pytree of its state (nnx.split would turn the state's containers into
  # dicts).
  return nnx.state(model, nnx.Param), optimizer


def resnet18() -> tuple[Any, Any]:
  """ResNet-18 with the registry's Padam for CIFAR-10 (the trainer's optimizer)."""
  setup = optimizers.make_optimizer(
    "padam", task="cifar10", steps_per_epoch=390, epochs=200, batch_size=128, train_size=50_000
  )
  return nnx_state(lambda: models.create_model("resnet18", rngs=nnx.Rngs(0)), setup.tx)


def transformer() -> tuple[Any, Any]:
  """The ~100M-parameter decoder of ``benchmarks/update_speed.py`` with ``padam_jax.padam``."""
  from benchmarks.update_speed import transformer_shapes

  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in transformer_shapes().items()}
  return params, jax.eval_shape(padam_jax.padam(learning_rate=0.1, p=0.125).init, params)


MODELS = {"ResNet-18": resnet18, "GPT-2-style decoder": transformer}


def count(params: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def table(fsdp_sizes: Sequence[int]) -> str:
  """The Markdown table: per model, Padam's state and the parameters on each device, replicated
  (fsdp=1) and for each of ``fsdp_sizes``."""
  sizes = [1, *fsdp_sizes]
  head = ["model", "per device", *[f"fsdp={k}" for k in sizes]]
  lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(sizes)]
  for name, build in MODELS.items():
    params, state = build()
    rows = [memory(params, state, k) for k in sizes]
    for label, key, first in (
      ("Padam state", "optimizer_state_bytes_per_device", f"{name}, {count(params) / 1e6:.1f}M"),
      ("parameters", "param_bytes_per_device", ""),
    ):
      cells = [first, label, *[f"{r[key] / MIB:.1f} MiB" for r in rows]]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


# Ways of keeping Padam's state, for the bytes-per-parameter table: name -> wrapper of an optimizer
# factory's keyword arguments.
STATE_KINDS: dict[str, Callable[..., optax.GradientTransformation]] = {
  "float32": lambda **kw: padam_jax.padam(**kw),
  "bfloat16 (`mu_dtype`, `nu_dtype`)": lambda **kw: padam_jax.padam(
    **kw, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16
  ),
  "8-bit (`with_quantized_state`, blocks of 16)": lambda **kw: padam_jax.with_quantized_state(
    padam_jax.padam(**kw)
  ),
  "8-bit, blocks of 32": lambda **kw: padam_jax.with_quantized_state(
    padam_jax.padam(**kw), block_size=32
  ),
  "8-bit, blocks of 64": lambda **kw: padam_jax.with_quantized_state(
    padam_jax.padam(**kw), block_size=64
  ),
}
PADAM = {"learning_rate": 0.1, "p": 0.125, "weight_decay": 5e-4}


def resnet18_with(tx: optax.GradientTransformation) -> tuple[Any, Any]:
  """The abstract parameters of the CIFAR-10 trainer's ResNet-18 and an ``nnx.Optimizer``'s
  state of ``tx`` for them."""
  return nnx_state(lambda: models.create_model("resnet18", rngs=nnx.Rngs(0)), tx)


def transformer_with(tx: optax.GradientTransformation) -> tuple[Any, Any]:
  """The ~100M-parameter decoder's abstract parameters and the state of ``tx`` for them."""
  from benchmarks.update_speed import transformer_shapes

  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in transformer_shapes().items()}
  return params, jax.eval_shape(tx.init, params)


def quantized_leaves(state: Any) -> list[padam_jax.QuantizedArray]:
  """The quantized leaves (codes and header) of every :class:`padam_jax.QuantizedState` in
  ``state``."""

  def is_state(x: Any) -> bool:
    return isinstance(x, padam_jax.QuantizedState)

  states = [x for x in jax.tree.leaves(state, is_leaf=is_state) if is_state(x)]
  return [leaf for s in states for leaf in s.quantized_arrays()]


def straddling(state: Any, fsdp: int) -> int:
  """How many quantized leaves of ``state`` have blocks that straddle two devices when their
  parameter is split over ``fsdp`` devices by the trainers' rule (:func:`examples.training.fsdp_spec`):
  split along the last axis into parts that are not a multiple of the block size."""
  count = 0
  for x in quantized_leaves(state):
    block_size = x.shape[-1] // x.header.shape[-1]
    spec = training.fsdp_spec(x.shape, fsdp)
    if len(spec) == len(x.shape) and spec[-1] is not None:
      count += (x.shape[-1] // fsdp) % block_size != 0
  return count


def bytes_table(fsdp_sizes: Sequence[int]) -> str:
  """The Markdown table of the bytes of Padam's state per parameter, by how it is kept."""
  builds = {"ResNet-18": resnet18_with, "decoder": transformer_with}
  sizes = ", ".join(map(str, fsdp_sizes))
  head = ["state", *builds, f"quantized leaves with blocks straddling devices, fsdp={sizes}"]
  lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(builds) + "---|"]
  for kind, make in STATE_KINDS.items():
    cells, straddle = [kind], []
    for name, build in builds.items():
      params, state = build(make(**PADAM))
      cells.append(f"{tree_memory(state, 1)[0] / count(params):.2f}")
      if quantized_leaves(state):
        counts = ", ".join(str(straddling(state, k)) for k in fsdp_sizes)
        straddle.append(f"{name}: {counts} of {len(quantized_leaves(state))}")
    cells.append("; ".join(straddle))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


# --- Precision of a narrow state ---------------------------------------------------------------

PRECISION_SHAPE = (16, 256)
PRECISION_STEPS = 2000
LAST_STEPS = 100


def replayed_gradients(key: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """``t -> g_t``: per coordinate a scale ``10**U(-4, 0)`` times (a fixed mean ``N(0, 0.3^2)``
  plus ``N(0, 1)`` noise drawn afresh at each step ``t``)."""
  scale_key, mean_key = jax.random.split(key)
  scale = 10.0 ** jax.random.uniform(scale_key, PRECISION_SHAPE, minval=-4.0, maxval=0.0)
  mean = 0.3 * jax.random.normal(mean_key, PRECISION_SHAPE)
  return lambda t: scale * (mean + jax.random.normal(jax.random.fold_in(key, t), PRECISION_SHAPE))


Roundtrip = Callable[[jax.Array, jax.Array, int], jax.Array]


def stored_as(
  tx: optax.GradientTransformation, roundtrip: Roundtrip
) -> optax.GradientTransformation:
  """``tx`` whose state leaves of ``PRECISION_SHAPE`` go through ``roundtrip(x, count, leaf)``
  (a code and back, in float32) after each update: a state stored in that code."""

  def init_fn(params):
    return jnp.zeros([], jnp.int32), tx.init(params)

  def update_fn(updates, state, params=None):
    count, inner = state
    updates, inner = tx.update(updates, inner, params)
    count = count + 1
    leaves, treedef = jax.tree.flatten(inner)
    leaves = [
      roundtrip(x, count, i) if x.shape == PRECISION_SHAPE else x for i, x in enumerate(leaves)
    ]
    return updates, (count, treedef.unflatten(leaves))

  return optax.GradientTransformation(init_fn, update_fn)


def to_bfloat16(x: jax.Array, count: jax.Array, leaf: int) -> jax.Array:
  """Rounded to the nearest bfloat16 (``astype``)."""
  del count, leaf
  return x.astype(jnp.bfloat16).astype(jnp.float32)


def library_code(nearest: bool) -> Roundtrip:
  """The codes of :func:`padam_jax.with_quantized_state` (blocks of 16), rounded to nearest or
  stochastically."""

  def roundtrip(x, count, leaf):
    noise = jnp.full(x.shape, 2**31, jnp.uint32) if nearest else random_bits(x, count, leaf)
    return _quantized.decode(*_quantized.encode(x, 16, noise))

  return roundtrip


def table_code(
  signed: np.ndarray, unsigned: np.ndarray, block_size: int, nearest: bool = False
) -> Roundtrip:
  """A code given by its values on ``[-1, 1]`` (blocks with a negative element) and on
  ``[0, 1]`` (the others), scaled by each block's largest magnitude (stored in float32)."""
  tables = [jnp.asarray(np.unique(t), jnp.float32) for t in (signed, unsigned)]

  def snap(y, table, u):
    index = jnp.clip(jnp.searchsorted(table, y), 1, table.shape[0] - 1)
    low, high = table[index - 1], table[index]
    return jnp.where(u < (y - low) / (high - low), high, low)

  def roundtrip(x, count, leaf):
    blocks = x.reshape(*x.shape[:-1], -1, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    absmax = jnp.where(absmax > 0, absmax, 1.0)
    u = uniform(random_bits(x, count, leaf)).reshape(blocks.shape)
    u = jnp.full_like(u, 0.5) if nearest else u
    y = blocks / absmax
    out = jnp.where(
      jnp.all(blocks >= 0, axis=-1, keepdims=True), snap(y, tables[1], u), snap(y, tables[0], u)
    )
    return (out * absmax).reshape(x.shape)

  return roundtrip


def either(signed: Roundtrip, unsigned: Roundtrip) -> Roundtrip:
  """``unsigned`` for the leaves whose elements are all >= 0 (second moments), else ``signed``."""
  return lambda x, count, leaf: jnp.where(
    jnp.all(x >= 0), unsigned(x, count, leaf), signed(x, count, leaf)
  )


def dynamic_tables() -> tuple[np.ndarray, np.ndarray]:
  """The dynamic (tree) code of Dettmers et al.: a sign (signed code), a run of zeros for the
  decimal exponent ``e``, then ``bits - e`` bits of a linear fraction of ``(0.1, 1]``."""
  signed, unsigned = [0.0], [0.0]
  for table, bits in ((signed, 6), (unsigned, 7)):
    for e in range(bits + 1):
      steps = 2 ** (bits - e)
      values = [10.0**-e * (0.1 + 0.9 * (k + 1) / steps) for k in range(steps)]
      table += values + ([-v for v in values] if bits == 6 else [])
  return np.array(signed), np.array(unsigned)


def e4m3_tables() -> tuple[np.ndarray, np.ndarray]:
  """``float8_e4m3fn``'s values over its largest, 448."""
  values = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
  values = values[np.isfinite(values)] / 448
  return values, values[values >= 0]


def storage_variants(p: float) -> dict[str, optax.GradientTransformation]:
  """Padam's rule (``scale_by_partial_amsgrad``) at ``p``, with its state kept in each way."""
  rule = functools.partial(padam_jax.scale_by_partial_amsgrad, p=p)
  linear = (np.arange(-127, 128) / 127, np.arange(256) / 255)
  return {
    "float32": rule(),
    "bfloat16, rounded to nearest": stored_as(rule(), to_bfloat16),
    "bfloat16, stochastic (`mu_dtype`, `nu_dtype`)": rule(
      mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16
    ),
    "8-bit `with_quantized_state`: e4m3 m, e5m3 v, 2^E scales": padam_jax.with_quantized_state(
      rule()
    ),
    "the same codes, rounded to nearest": stored_as(rule(), library_code(nearest=True)),
    "e4m3 m with an absmax scale, e5m3 v": stored_as(
      rule(), either(table_code(*e4m3_tables(), 16), library_code(nearest=False))
    ),
    "e4m3 m and v, absmax scales": stored_as(rule(), table_code(*e4m3_tables(), 16)),
    "linear (int8 m, uint8 v), absmax scales": stored_as(rule(), table_code(*linear, 16)),
    "dynamic (tree) m with an absmax scale, e5m3 v": stored_as(
      rule(), either(table_code(*dynamic_tables(), 16), library_code(nearest=False))
    ),
    "dynamic (tree) m and v, absmax scales": stored_as(rule(), table_code(*dynamic_tables(), 16)),
    "dynamic m and v, blocks of 256, rounded to nearest": stored_as(
      rule(), table_code(*dynamic_tables(), 256, nearest=True)
    ),
  }


def update_errors(p: float) -> tuple[list[str], np.ndarray, np.ndarray]:
  """Per storage variant, the relative error ``|u - u32| / |u32|`` of the update and its bias
  ``<u, u32> / |u32|^2 - 1`` (the component along float32's update), averaged over the last
  ``LAST_STEPS`` of ``PRECISION_STEPS`` replayed steps."""
  variants = storage_variants(p)
  gradient = replayed_gradients(jax.random.key(0, impl="rbg"))

  def step(states, t):
    g = gradient(t)
    outs = [tx.update(g, state) for tx, state in zip(variants.values(), states, strict=True)]
    reference = outs[0][0]
    norm = jnp.sum(reference * reference)
    error = jnp.stack([jnp.sqrt(jnp.sum((u - reference) ** 2) / norm) for u, _ in outs])
    bias = jnp.stack([jnp.sum(u * reference) / norm - 1 for u, _ in outs])
    return [state for _, state in outs], (error, bias)

  params = jnp.zeros(PRECISION_SHAPE)
  states = [tx.init(params) for tx in variants.values()]
  run = jax.jit(lambda s: jax.lax.scan(step, s, jnp.arange(PRECISION_STEPS))[1])
  error, bias = run(states)
  return (
    list(variants),
    np.asarray(error[-LAST_STEPS:]).mean(0),
    np.asarray(bias[-LAST_STEPS:]).mean(0),
  )


def precision_table() -> str:
  """The Markdown table of :func:`update_errors` at p = 1/8 (Padam) and p = 1/2 (AMSGrad)."""
  head = ["state", "p = 1/8 error", "p = 1/8 bias", "p = 1/2 error", "p = 1/2 bias"]
  lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * 4]
  columns = [update_errors(p)[1:] for p in (0.125, 0.5)]
  for i, name in enumerate(storage_variants(0.125)):
    if i == 0:
      continue
    cells = [name]
    for error, bias in columns:
      cells += [_percent(error[i]), f"{100 * bias[i]:+.1f}%"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _percent(x: float) -> str:
  return f"{100 * x:.1f}%" if x < 10 else f"{x:.0f}x"


def cpu_model() -> str:
  """The CPU's model name (``lscpu``), or the platform's processor string."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return platform.processor() or "unknown"
  names = [
    line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
  ]
  return names[0] if names else platform.processor() or "unknown"


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.state_memory", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument(
    "--fsdp",
    type=int,
    nargs="+",
    default=[2, 4, 8],
    metavar="K",
    help="sizes of the fsdp axis (default: 2 4 8); the first column is fsdp=1, the state replicated",
  )
  args = parser.parse_args(argv)
  if any(k < 1 for k in args.fsdp):
    parser.error(f"--fsdp {' '.join(map(str, args.fsdp))} is not valid; expected sizes >= 1")
  print(f"Bytes per device (MiB = 2^20 bytes); arrays of {training.FSDP_MIN_SIZE}+ elements split.")
  print(table(args.fsdp))
  print()
  print("Bytes of Padam's state per parameter (`padam_jax.padam`, float32 parameters):")
  print()
  print(bytes_table(args.fsdp))
  print()
  print(
    f"Padam's update with its state stored narrow against float32's, the same gradients replayed "
    f"for {PRECISION_STEPS} steps (mean over the last {LAST_STEPS}; b1 = 0.9, b2 = 0.999, "
    f"blocks of 16 unless named):"
  )
  print()
  print(precision_table())
  print()
  print(f"`python -m benchmarks.state_memory` on {cpu_model()}, JAX {jax.__version__}.")


if __name__ == "__main__":
  main()
