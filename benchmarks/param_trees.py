"""The parameter trees the optimizer step is timed on: a CIFAR ResNet-18 and a ~100M transformer.

Only the shapes matter (the arrays are drawn by :class:`benchmarks.step_timing.Bench`):
:func:`resnet18_shapes` and :func:`transformer_shapes` give them by parameter name, :func:`trees`
the trees of a run (full size, or scaled down for a smoke test).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Shapes = dict[str, tuple[int, ...]]


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
  """The bytes of a tree's arrays."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


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
