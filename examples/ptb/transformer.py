"""A decoder-only transformer language model (GPT-style), in Flax NNX.

The model of Radford et al. (GPT-2, 2019) at small sizes: token embeddings plus learned position
embeddings, ``num_layers`` pre-LayerNorm blocks, a final LayerNorm and a softmax that shares the
token embedding matrix (tied). A block is::

  x = x + proj(attention(qkv(ln1(x))))        # causal multi-head self-attention
  x = x + out(gelu(fc(ln2(x))))               # MLP of 4x the width

Attention is ``jax.nn.dot_product_attention`` with ``is_causal=True``, so that an accelerator can
use its fused attention kernel; a position sees itself and the positions before it, never after.
Weights are drawn from normal(0, 0.02), the two projections that write into the residual stream
(``proj``, ``out``) from normal(0, 0.02 / sqrt(2 num_layers)) as GPT-2 does; biases start at zero.
There is no dropout: the sizes here train for a few passes over a few hundred thousand tokens.

A window carries no state into the next (the model's ``carry`` is None): each window of
``context`` tokens is read from its own start. The sizes:

- ``transformer-small``: 4 layers, width 128, 4 heads of 32, context 64; 2.1M parameters with PTB's
  10,000-word vocabulary (1.3M of them the tied embedding).
- ``transformer-tiny``: 2 layers, width 32, 2 heads, context 16, for tests.

Mixed precision: with ``dtype`` bfloat16 or float16, every matrix product (the projections, the
MLP, attention and the softmax layer) takes operands in ``dtype``; the residual stream, the
LayerNorms, the parameters and the logits are float32.

Weight decay: the registry's ``lm`` task decays matrices only. :func:`decay_mask` says which
parameters those are: the kernels of the dense layers, not the embeddings, biases or norms.

References:
  Vaswani et al., *Attention Is All You Need*, NeurIPS 2017.
  Radford et al., *Language Models are Unsupervised Multitask Learners*, 2019 (GPT-2).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
  """The sizes and training defaults of one transformer language model.

  Attributes:
    num_layers: transformer blocks.
    width: the residual stream's width (the embedding size).
    num_heads: attention heads; ``width`` must be a multiple of it.
    context: the longest window (positions with an embedding); the default window length.
    mlp_ratio: the MLP's hidden width over ``width``.
    init_std: standard deviation of the weights' normal initialization.
    clip: default global gradient-norm clip.
  """

  num_layers: int
  width: int
  num_heads: int
  context: int
  mlp_ratio: int = 4
  init_std: float = 0.02
  clip: float = 1.0

  @property
  def bptt(self) -> int:
    """The default window length (the trainer's ``--bptt``): the context."""
    return self.context

  def describe(self) -> str:
    return (
      f"transformer, {self.num_layers} layers, width {self.width}, {self.num_heads} heads, "
      f"context {self.context}, clip {self.clip}"
    )


TRANSFORMERS: dict[str, TransformerSpec] = {
  "transformer-tiny": TransformerSpec(num_layers=2, width=32, num_heads=2, context=16),
  "transformer-small": TransformerSpec(num_layers=4, width=128, num_heads=4, context=64),
  # GPT-2/GPT-3 shapes (layers x width, heads of 64 or 128, context 1,024), for pod runs and their
  # plans (benchmarks.pod_plan); with PTB's 10,000 words 93M, 313M, 696M and 1.23B parameters.
  "transformer-12x768": TransformerSpec(num_layers=12, width=768, num_heads=12, context=1024),
  "transformer-24x1024": TransformerSpec(num_layers=24, width=1024, num_heads=16, context=1024),
  "transformer-24x1536": TransformerSpec(num_layers=24, width=1536, num_heads=12, context=1024),
  "transformer-24x2048": TransformerSpec(num_layers=24, width=2048, num_heads=16, context=1024),
}


def _product(subscripts: str, x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """``jnp.einsum(subscripts, x, w)`` with operands in ``dtype``, returned in float32."""
  if dtype == jnp.float32:
    return jnp.einsum(subscripts, x, w)
  return jnp.einsum(subscripts, x.astype(dtype), w.astype(dtype)).astype(jnp.float32)


class Block(nnx.Module):
  """One pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

  def __init__(
    self, spec: TransformerSpec, *, rngs: nnx.Rngs, dtype: jax.typing.DTypeLike = jnp.float32
  ):
    width = spec.width
    if width % spec.num_heads:
      raise ValueError(f"width {width} is not a multiple of {spec.num_heads} heads")
    self.num_heads = spec.num_heads
    self.dtype = jnp.dtype(dtype)
    init = nnx.initializers.normal(spec.init_std)
    residual = nnx.initializers.normal(spec.init_std / math.sqrt(2 * spec.num_layers))

    def dense(n_in: int, n_out: int, kernel_init) -> nnx.Linear:
      return nnx.Linear(n_in, n_out, kernel_init=kernel_init, dtype=self.dtype, rngs=rngs)

    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.qkv = dense(width, 3 * width, init)
    self.proj = dense(width, width, residual)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.fc = dense(width, spec.mlp_ratio * width, init)
    self.out = dense(spec.mlp_ratio * width, width, residual)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, time, width = x.shape
    heads = self.num_heads
    qkv = self.qkv(self.ln1(x)).reshape(batch, time, 3, heads, width // heads)
    attended = jax.nn.dot_product_attention(
      qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True
    )
    x = x + self.proj(attended.reshape(batch, time, width)).astype(jnp.float32)
    hidden = jax.nn.gelu(self.fc(self.ln2(x)))
    return x + self.out(hidden).astype(jnp.float32)


class TransformerLanguageModel(nnx.Module):
  """Token and position embeddings, transformer blocks, a final LayerNorm, the tied softmax.

  ``model(tokens, carry)`` returns ``(logits, None)``: the same call as the LSTMs', with no state
  carried from one window to the next.
  """

  def __init__(
    self,
    spec: TransformerSpec,
    vocab_size: int,
    *,
    rngs: nnx.Rngs,
    dtype: jax.typing.DTypeLike = jnp.float32,
  ):
    self.spec = spec
    self.vocab_size = vocab_size
    self.dtype = jnp.dtype(dtype)
    init = nnx.initializers.normal(spec.init_std)
    self.embed = nnx.Embed(vocab_size, spec.width, embedding_init=init, rngs=rngs)
    self.position = nnx.Param(init(rngs.params(), (spec.context, spec.width)))
    self.blocks = nnx.List([Block(spec, rngs=rngs, dtype=dtype) for _ in range(spec.num_layers)])
    self.ln_f = nnx.LayerNorm(spec.width, rngs=rngs)

  def zero_carry(self, batch_size: int) -> None:
    del batch_size
    return None

  def __call__(
    self, tokens: jax.Array, carry: Any = None, *, rng: jax.Array | None = None
  ) -> tuple[jax.Array, None]:
    """Logits for the next token at every position of a window.

    Args:
      tokens: (batch, time) int token ids, ``time <= context``.
      carry: ignored (None): windows are independent.
      rng: ignored: the model has no dropout.

    Returns:
      (batch, time, vocab) float32 logits, and None.
    """
    del carry, rng
    time = tokens.shape[1]
    if time > self.spec.context:
      raise ValueError(f"a window of {time} tokens exceeds the context of {self.spec.context}")
    x = self.embed(tokens) + self.position[:time][None]
    for block in self.blocks:
      x = block(x)
    x = self.ln_f(x)
    return _product("btd,vd->btv", x, self.embed.embedding[...], self.dtype), None


def decay_mask(params: Any) -> Any:
  """True for the parameters weight decay applies to: the dense layers' kernels (matrices), not
  the token and position embeddings, the biases or the LayerNorms.

  Works on any pytree whose paths name the leaves as NNX does (``.../qkv/kernel/value``).
  """

  def is_kernel(path, _) -> bool:
    names = [getattr(k, "key", None) for k in path]
    return "kernel" in names

  return jax.tree_util.tree_map_with_path(is_kernel, params)
