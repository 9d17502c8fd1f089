"""Memory per device of the parameters and of Padam's state, replicated and split over ``fsdp``.

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
counters. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import padam_jax
from examples import optimizers, training
from examples.cifar10 import models

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

  _, state = nnx.split(nnx.eval_shape(create))
  return nnx.filter_state(state[0], nnx.Param), state[1]


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


if __name__ == "__main__":
  main()
