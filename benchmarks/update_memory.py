"""The memory an optimizer update needs at its peak, per device, with its state in float32, bfloat16
and 8 bits, from XLA's own analyses of the compiled step.

    python -m benchmarks.update_memory [--trees resnet18 transformer] [--fsdp 1 8]
    python -m benchmarks.update_memory --topology v5e:2x4   # for TPU chips, without a TPU

The step is the one a training loop runs after the gradient: Padam's update (p = 1/8) and
``optax.apply_updates``, jitted with the parameters and the state donated, compiled from abstract
arrays (nothing is allocated) for this machine's devices, or with ``--topology`` for the chips of a
TPU slice that is not attached (``jax.experimental.topologies``; ``libtpu`` must be installed), on
a mesh whose ``fsdp`` axis splits each array by the trainers' rule
(:func:`examples.training.fsdp_spec`). Per device it prints:

- **state**: the optimizer state's bytes (from the arrays' shapes and shardings);
- **temporaries**: the step's temporary buffers (``memory_analysis().temp_size_in_bytes``),
  allocated at every call;
- **state + temporaries**: what the state costs at the update's peak; float32's state needs no
  temporaries, so this is the number a compact state must beat;
- **peak**: arguments + outputs - donated (aliased) bytes + temporaries: parameters, gradients,
  state and the step's scratch, all live at once;
- **bytes accessed**: the cost model's count (``cost_analysis()``) of the bytes read and written.

The 8-bit state is compiled twice: as ``with_quantized_state`` updates it by default (a parameter
of more than ``2**22`` elements in slices of its rows) and with ``chunk_size=None`` (each parameter
whole, as the trainers do when ``--mesh`` splits the state).

The trees are :mod:`benchmarks.param_trees`' CIFAR ResNet-18 (11.2M parameters, largest leaf
9.4 MB in float32), GPT-2-style decoder (98.4M, largest leaf 50.3 MB) and that decoder's largest
leaf alone (its 16,384 x 768 token embedding). Compiling the 98M tree
takes a minute or two per row on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.experimental import topologies
from jax.sharding import Mesh

import padam_jax
from benchmarks import param_trees
from benchmarks.speed_report import cpu_model
from examples.training import devices

MB = 1e6
P = 0.125

FORMS: dict[str, Callable[[], optax.GradientTransformation]] = {
  "float32": lambda: padam_jax.padam(0.1, p=P),
  "bfloat16": lambda: padam_jax.padam(0.1, p=P, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
  "8-bit": lambda: padam_jax.with_quantized_state(padam_jax.padam(0.1, p=P)),
  "8-bit, whole leaves": lambda: padam_jax.with_quantized_state(
    padam_jax.padam(0.1, p=P), chunk_size=None
  ),
}
TREES = {
  "resnet18": param_trees.resnet18_shapes,
  "transformer": param_trees.transformer_shapes,
  # The decoder's largest parameter alone, its token embedding.
  "embedding": lambda: {"embed/tokens": param_trees.transformer_shapes()["embed/tokens"]},
}


def per_device_bytes(tree: Any, shardings: Any) -> int:
  """Bytes of ``tree``'s arrays (``jax.ShapeDtypeStruct``) held by one device."""
  leaves, specs = jax.tree.leaves(tree), jax.tree.leaves(shardings)
  return sum(
    math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
    for x, s in zip(leaves, specs, strict=True)
  )


def peak_bytes(memory: Any) -> int:
  """A compiled program's peak from its ``memory_analysis()``: arguments + outputs - donated
  (aliased) bytes + temporaries."""
  return (
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
    + memory.temp_size_in_bytes
  )


def target_devices(topology: str | None) -> list[Any]:
  """This machine's devices, or the chips of a TPU ``topology`` such as ``v5e:2x2`` (compiled
  for without a TPU: needs ``libtpu``, e.g. ``pip install "jax[tpu]"``)."""
  if topology is None:
    return jax.devices()
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is opened: no lock needed
  return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)


def _placed(tree: Any, mesh: Mesh) -> tuple[Any, Any]:
  """``tree`` (``jax.ShapeDtypeStruct``) laid out by the trainers' rule, and its shardings."""
  shardings = devices.state_shardings(tree, mesh)
  placed = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )
  return placed, shardings


def analyse(tree: str, form: str, chips: Sequence[Any]) -> dict[str, float]:
  """The compiled update step's memory and cost per device on a mesh of ``chips`` (its fsdp
  axis), in MB (bytes accessed in GB)."""
  mesh = Mesh(list(chips), (devices.FSDP_AXIS,))
  tx = FORMS[form]()
  params, param_shardings = _placed(
    {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in TREES[tree]().items()}, mesh
  )
  state, state_shardings = _placed(jax.eval_shape(tx.init, params), mesh)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jitted = jax.jit(
    step,
    in_shardings=(param_shardings, state_shardings, param_shardings),
    out_shardings=(param_shardings, state_shardings),
    donate_argnums=(0, 1),
  )
  compiled = jitted.lower(params, state, params).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  peak = peak_bytes(memory)
  state_bytes = per_device_bytes(state, state_shardings)
  return {
    "state": state_bytes / MB,
    "temporaries": memory.temp_size_in_bytes / MB,
    "state + temporaries": (state_bytes + memory.temp_size_in_bytes) / MB,
    "peak": peak / MB,
    "bytes accessed GB": float(cost.get("bytes accessed", 0.0)) / 1e9,
  }


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trees", nargs="+", choices=sorted(TREES), default=list(TREES))
  parser.add_argument("--fsdp", nargs="+", type=int, default=[1, 8], help="fsdp axis sizes")
  parser.add_argument("--forms", nargs="+", choices=list(FORMS), default=list(FORMS))
  parser.add_argument(
    "--topology",
    default=None,
    help="compile for the chips of this TPU topology instead (e.g. v5e:2x2; needs libtpu)",
  )
  args = parser.parse_args(argv)
  if any(k < 1 for k in args.fsdp):
    parser.error(f"--fsdp sizes must be >= 1, got {args.fsdp}")
  if args.topology is None:
    jax.config.update("jax_num_cpu_devices", max(args.fsdp))  # before the backend starts
  try:
    chips = target_devices(args.topology)
  except (ImportError, RuntimeError) as e:  # no libtpu, or a topology it does not know
    parser.error(f"--topology {args.topology}: {str(e).splitlines()[0]}")
  if max(args.fsdp) > len(chips):
    parser.error(f"--fsdp {max(args.fsdp)} needs that many devices; there are {len(chips)}")
  target = f"XLA:TPU, {args.topology}" if args.topology else f"XLA:{jax.default_backend().upper()}"
  columns = ["state", "temporaries", "state + temporaries", "peak", "bytes accessed GB"]
  print("# Padam's update step: memory per device at its peak\n")
  print(
    f"`python -m benchmarks.update_memory` on {cpu_model()} ({os.cpu_count()} cores), JAX "
    f"{jax.__version__}, compiled for {target}; MB = 10^6 bytes.\n"
  )
  for tree in args.trees:
    print(f"## {tree}\n")
    print("| fsdp | state kept in | " + " | ".join(columns) + " |")
    print("|---:|---|" + "---:|" * len(columns))
    for fsdp in args.fsdp:
      for form in args.forms:
        row = analyse(tree, form, chips[:fsdp])
        cells = [f"{row[c]:,.2f}" if c.endswith("GB") else f"{row[c]:,.1f}" for c in columns]
        print(f"| {fsdp} | {form} | " + " | ".join(cells) + " |", flush=True)
    print()
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
