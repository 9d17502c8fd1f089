"""The paper's CIFAR-10 networks and CPU-sized ResNets, in Flax NNX.

The paper's three models follow the authors' reference PyTorch code:

- ``vgg16``: conv3x3(bias)-BN-ReLU blocks, configuration 64,64,M,128,128,M,256x3,M,512x3,M,512x3,M,
  then one linear layer 512 -> 10, no dropout.
- ``resnet18``: the CIFAR ResNet-18 (3x3 stem of 64 channels, stride 1, no max-pool), post-activation
  basic blocks [2, 2, 2, 2] of widths 64/128/256/512, 1x1 conv + BN shortcut on a change of shape,
  global average pool, linear.
- ``wrn16_4``: what the reference code calls WRN-16-4: the same basic blocks, 2 per stage, 3 stages of
  widths 64/128/256 (strides 1/2/2) after a 3 -> 64 stem, no dropout.

The small models are He et al.'s CIFAR ResNets (depth 6n+2, 3 stages of n basic blocks, widths
16/32/64 times a width multiplier, parameter-free "option A" shortcuts: stride-2 subsampling and
zero-padded channels), which make a training step cheap enough for a CPU.

Every convolution uses He-normal initialization (fan-out, as the reference WRN); BatchNorm uses
PyTorch's defaults (momentum 0.1, i.e. Flax's 0.9, epsilon 1e-5).

Mixed precision: ``dtype`` (float32, bfloat16 or float16) is the dtype of the activations and of
the operands of every convolution and linear layer. The parameters are float32 whatever it is
(cast to ``dtype`` where they are used, so their gradients are float32), BatchNorm computes its
statistics, running averages and normalization in float32, and the logits are float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

NUM_CLASSES = 10

_he_normal = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(
  in_features: int,
  out_features: int,
  kernel: int,
  stride: int,
  rngs: nnx.Rngs,
  *,
  use_bias: bool = False,
  dtype: jax.typing.DTypeLike = jnp.float32,
) -> nnx.Conv:
  return nnx.Conv(
    in_features,
    out_features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((kernel // 2, kernel // 2), (kernel // 2, kernel // 2)),
    use_bias=use_bias,
    kernel_init=_he_normal,
    dtype=dtype,
    param_dtype=jnp.float32,
    rngs=rngs,
  )


class BatchNorm(nnx.BatchNorm):
  """``nnx.BatchNorm`` computed in float32 whatever the input's dtype; the output in the input's.

  Under bfloat16 or float16 activations the batch statistics, the running averages and the
  normalization stay float32, and only the result is rounded.
  """

  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    y = super().__call__(x.astype(jnp.float32), use_running_average, mask=mask)
    return y.astype(x.dtype)


def _batch_norm(features: int, rngs: nnx.Rngs) -> BatchNorm:
  # PyTorch's BatchNorm2d defaults: running = 0.9 running + 0.1 batch, eps 1e-5.
  return BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)


def _linear(in_features: int, out_features: int, rngs: nnx.Rngs, dtype: jax.typing.DTypeLike):
  return nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _logits(head: nnx.Linear, features: jax.Array) -> jax.Array:
  """The classifier's float32 logits (the loss and softmax are float32 whatever the dtype)."""
  return head(features).astype(jnp.float32)


class BasicBlock(nnx.Module):
  """Post-activation basic block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)).

  ``shortcut="projection"`` uses a 1x1 conv + BN on a change of shape (the reference ResNet-18 and
  WRN); ``shortcut="pad"`` subsamples and zero-pads channels (He et al.'s option A for CIFAR).
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    stride: int,
    shortcut: str,
    *,
    rngs: nnx.Rngs,
    dtype: jax.typing.DTypeLike = jnp.float32,
  ):
    self.conv1 = _conv(in_features, out_features, 3, stride, rngs, dtype=dtype)
    self.bn1 = _batch_norm(out_features, rngs)
    self.conv2 = _conv(out_features, out_features, 3, 1, rngs, dtype=dtype)
    self.bn2 = _batch_norm(out_features, rngs)
    self.stride = stride
    self.extra_channels = out_features - in_features
    self.needs_shortcut = stride != 1 or in_features != out_features
    self.shortcut_kind = shortcut
    if self.needs_shortcut and shortcut == "projection":
      self.shortcut_conv = _conv(in_features, out_features, 1, stride, rngs, dtype=dtype)
      self.shortcut_bn = _batch_norm(out_features, rngs)

  def _shortcut(self, x: jax.Array) -> jax.Array:
    if not self.needs_shortcut:
      return x
    if self.shortcut_kind == "projection":
      return self.shortcut_bn(self.shortcut_conv(x))
    x = x[:, :: self.stride, :: self.stride, :]
    half = self.extra_channels // 2
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (half, self.extra_channels - half)))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return nnx.relu(y + self._shortcut(x))


class ResNet(nnx.Module):
  """A CIFAR ResNet: 3x3 stem, stages of basic blocks, global average pool, linear classifier.

  Args:
    stem_features: channels of the 3x3 stem convolution.
    stage_features: channels of each stage.
    blocks_per_stage: number of basic blocks in each stage.
    shortcut: ``"projection"`` (1x1 conv + BN) or ``"pad"`` (He et al.'s option A).
    num_classes: outputs of the classifier.
    rngs: random streams for initialization.
    dtype: the compute dtype (activations, convolution and linear operands).
  """

  def __init__(
    self,
    stem_features: int,
    stage_features: Sequence[int],
    blocks_per_stage: Sequence[int],
    shortcut: str,
    *,
    num_classes: int = NUM_CLASSES,
    rngs: nnx.Rngs,
    dtype: jax.typing.DTypeLike = jnp.float32,
  ):
    self.stem_conv = _conv(3, stem_features, 3, 1, rngs, dtype=dtype)
    self.stem_bn = _batch_norm(stem_features, rngs)
    blocks = []
    features = stem_features
    for stage, (width, count) in enumerate(zip(stage_features, blocks_per_stage, strict=True)):
      for index in range(count):
        stride = 2 if stage > 0 and index == 0 else 1
        blocks.append(BasicBlock(features, width, stride, shortcut, rngs=rngs, dtype=dtype))
        features = width
    self.blocks = nnx.List(blocks)
    self.head = _linear(features, num_classes, rngs, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.stem_bn(self.stem_conv(x)))
    for block in self.blocks:
      x = block(x)
    # The average pool accumulates in float32 (the head rounds it to the compute dtype).
    return _logits(self.head, jnp.mean(x, axis=(1, 2), dtype=jnp.float32))


class VGG(nnx.Module):
  """VGG with BatchNorm for 32x32 inputs: conv3x3(bias)-BN-ReLU blocks and max-pools, one linear.

  Args:
    config: channel counts, with ``"M"`` for a 2x2 max-pool.
    num_classes: outputs of the classifier.
    rngs: random streams for initialization.
    dtype: the compute dtype (activations, convolution and linear operands).
  """

  def __init__(
    self,
    config: Sequence[int | str],
    *,
    num_classes: int = NUM_CLASSES,
    rngs: nnx.Rngs,
    dtype: jax.typing.DTypeLike = jnp.float32,
  ):
    convs, norms = [], []
    features = 3
    for item in config:
      if item != "M":
        convs.append(_conv(features, int(item), 3, 1, rngs, use_bias=True, dtype=dtype))
        norms.append(_batch_norm(int(item), rngs))
        features = int(item)
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.config = tuple(config)
    self.head = _linear(features, num_classes, rngs, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    layer = 0
    for item in self.config:
      if item == "M":
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
      else:
        x = nnx.relu(self.norms[layer](self.convs[layer](x)))
        layer += 1
    return _logits(self.head, x.reshape(x.shape[0], -1))


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _he_resnet(
  depth: int, width: float, *, rngs: nnx.Rngs, dtype: jax.typing.DTypeLike = jnp.float32
) -> ResNet:
  """He et al.'s CIFAR ResNet of depth 6n+2 with widths (16, 32, 64) x ``width``."""
  blocks, remainder = divmod(depth - 2, 6)
  if remainder or blocks < 1:
    raise ValueError(f"a CIFAR ResNet has depth 6n+2 (8, 14, 20, 32, ...), got {depth}")
  widths = [max(1, round(16 * width * 2**stage)) for stage in range(3)]
  return ResNet(widths[0], widths, [blocks] * 3, "pad", rngs=rngs, dtype=dtype)


# Each builder is called with the keywords ``rngs`` and ``dtype`` (see :func:`create_model`).
MODELS: dict[str, Callable[..., nnx.Module]] = {
  # The paper's models, as in the authors' reference code.
  "vgg16": functools.partial(VGG, _VGG16),
  "resnet18": functools.partial(ResNet, 64, (64, 128, 256, 512), (2, 2, 2, 2), "projection"),
  "wrn16_4": functools.partial(ResNet, 64, (64, 128, 256), (2, 2, 2), "projection"),
  # He et al.'s CIFAR ResNets and width-scaled versions, sized for CPU runs.
  "resnet20": functools.partial(_he_resnet, 20, 1.0),
  "resnet20_w2": functools.partial(_he_resnet, 20, 2.0),
  "resnet20_w4": functools.partial(_he_resnet, 20, 4.0),
  "resnet8": functools.partial(_he_resnet, 8, 1.0),
  "resnet8_w2": functools.partial(_he_resnet, 8, 2.0),
  "resnet8_w0.5": functools.partial(_he_resnet, 8, 0.5),
}


def create_model(
  name: str, *, rngs: nnx.Rngs, dtype: jax.typing.DTypeLike = jnp.float32
) -> nnx.Module:
  """Builds the model called ``name`` (a key of ``MODELS``).

  Args:
    name: the model's name, e.g. ``"resnet20"`` or ``"vgg16"``.
    rngs: random streams for the parameters' initialization.
    dtype: the compute dtype: float32, bfloat16 or float16 (the parameters are float32).

  Returns:
    The model, in training mode; it maps (batch, 32, 32, 3) float images to (batch, 10) float32
    logits.

  Raises:
    ValueError: for an unknown name; the message lists the valid ones.

  Examples:
    >>> from flax import nnx
    >>> model = create_model("resnet8_w0.5", rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 32, 32, 3))).shape
    (2, 10)
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
  return MODELS[name](rngs=rngs, dtype=dtype)


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (``nnx.Param`` leaves)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
