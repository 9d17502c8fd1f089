"""LSTM language models for Penn Treebank, in Flax NNX.

The paper trains "2-layer" and "3-layer" LSTMs on PTB without giving their sizes, and the authors'
reference PyTorch code has no language model. Its test perplexities (58-64) are those of a
regularized model in the style of AWD-LSTM (Merity et al., 2018: 58.8 before fine-tuning), and its
batch size of 20 is AWD-LSTM's for PTB. So:

- ``lstm2`` / ``lstm3`` (paper scale): AWD-LSTM's PTB model with 2 or 3 layers: embedding 400,
  hidden 1150 with the last layer 400 so that the softmax can share the embedding matrix (tied),
  variational ("locked") dropout 0.4 on the embeddings' output, 0.25 between layers and 0.4 on the
  last layer's output, embedding (word-type) dropout 0.1, DropConnect 0.5 on the recurrent weights,
  BPTT 70, gradient clipping at global norm 0.25, PyTorch's uniform(+-1/sqrt(hidden)) LSTM
  initialization and uniform(+-0.1) embeddings. 13.6M and 24.2M parameters. Not included:
  AWD-LSTM's variable BPTT length, activation regularization and NT-ASGD, which are its training
  recipe, not its model; the paper's comparison is of optimizers on a fixed model.
- ``lstm2-medium``: Zaremba et al. (2014)'s "medium" model: 2 x 650 units, embedding 650, dropout
  0.5 on every non-recurrent connection (a new mask per time step), uniform(+-0.05) initialization,
  BPTT 35, clipping at 5, untied. 19.8M parameters; 82.7 test perplexity in the paper (with SGD).
- ``lstm2-small``: Zaremba et al.'s "small" model: 2 x 200, embedding 200, no dropout,
  uniform(+-0.1), BPTT 20, clipping at 5, untied. 4.65M parameters, the size a 2-core CPU trains
  (114.5 test perplexity in the paper).
- ``lstm2-tiny``: 2 x 32, for smoke tests only.
- ``transformer-small``, ``transformer-tiny``, and ``transformer-12x768`` to ``-24x2048`` (93M to
  1.23B parameters, for pods): decoder-only transformers (:mod:`examples.ptb.transformer`), which
  carry no state across windows.

An LSTM layer computes, for gates in the order input, forget, cell, output::

  [i, f, g, o] = x_t W_ih + h_{t-1} W_hh + b
  c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
  h_t = sigmoid(o) * tanh(c_t)

with the input projection of a whole window done as one matrix product before the scan over time.
Dropout is applied only when the model is called with a random key (training); its masks are
derived from that key, so a step is a pure function of the parameters, the batch and the key.

Mixed precision: with ``dtype`` bfloat16 or float16, the three matrix products (the input
projection, ``h_{t-1} W_hh`` and the softmax layer) take their operands rounded to ``dtype`` and
return ``dtype``, widened to float32 at once; the parameters, embeddings, gates, the cell state, the
carried ``(h, c)`` and the logits are float32. In float32 it is the plain float32 model.

References:
  Zaremba, Sutskever, Vinyals, *Recurrent Neural Network Regularization*, arXiv:1409.2329, 2014.
  Merity, Keskar, Socher, *Regularizing and Optimizing LSTM Language Models*, ICLR 2018.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from examples.ptb import transformer

Carry = tuple[tuple[jax.Array, jax.Array], ...]  # ((h, c) of layer 1, (h, c) of layer 2, ...)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The sizes, regularization and training defaults of one language model.

  Attributes:
    embed_size: word embedding width.
    hidden_sizes: LSTM units per layer, first to last.
    tie_weights: share the embedding matrix with the softmax (needs ``hidden_sizes[-1] ==
      embed_size``).
    init_scale: LSTM and untied softmax weights ~ uniform(+-init_scale); None: uniform(+-1/sqrt(h))
      for a layer of ``h`` units (PyTorch's default) and a zero softmax bias.
    embed_init: embeddings ~ uniform(+-embed_init).
    locked_dropout: one dropout mask per sequence, shared by its time steps (variational), or a new
      mask per time step.
    dropout_embed: drops whole word types from the embedding matrix.
    dropout_input: on the embeddings' output.
    dropout_hidden: on the output of every layer but the last.
    dropout_output: on the last layer's output.
    dropout_weight: DropConnect on the recurrent matrices ``W_hh``.
    bptt: default window length.
    clip: default global gradient-norm clip.
  """

  embed_size: int
  hidden_sizes: tuple[int, ...]
  tie_weights: bool = False
  init_scale: float | None = 0.1
  embed_init: float = 0.1
  locked_dropout: bool = False
  dropout_embed: float = 0.0
  dropout_input: float = 0.0
  dropout_hidden: float = 0.0
  dropout_output: float = 0.0
  dropout_weight: float = 0.0
  bptt: int = 35
  clip: float = 5.0

  @property
  def num_layers(self) -> int:
    return len(self.hidden_sizes)


def _awd_lstm(num_layers: int) -> ModelSpec:
  return ModelSpec(
    embed_size=400,
    hidden_sizes=(1150,) * (num_layers - 1) + (400,),
    tie_weights=True,
    init_scale=None,
    embed_init=0.1,
    locked_dropout=True,
    dropout_embed=0.1,
    dropout_input=0.4,
    dropout_hidden=0.25,
    dropout_output=0.4,
    dropout_weight=0.5,
    bptt=70,
    clip=0.25,
  )


MODELS: dict[str, ModelSpec | transformer.TransformerSpec] = {
  "lstm2-tiny": ModelSpec(embed_size=32, hidden_sizes=(32, 32), init_scale=0.1, bptt=20),
  "lstm2-small": ModelSpec(embed_size=200, hidden_sizes=(200, 200), init_scale=0.1, bptt=20),
  "lstm2-medium": ModelSpec(
    embed_size=650,
    hidden_sizes=(650, 650),
    init_scale=0.05,
    dropout_input=0.5,
    dropout_hidden=0.5,
    dropout_output=0.5,
    bptt=35,
  ),
  "lstm2": _awd_lstm(2),
  "lstm3": _awd_lstm(3),
  **transformer.TRANSFORMERS,
}


def get_spec(
  name: str, *, tie_weights: bool | None = None
) -> ModelSpec | transformer.TransformerSpec:
  """The :class:`ModelSpec` (an LSTM's) or ``TransformerSpec`` called ``name``, optionally with
  tying switched on or off (an LSTM's only: a transformer's softmax is always tied).

  Raises:
    ValueError: for an unknown name (the message lists the valid ones), tying a model whose last
      layer is not as wide as its embedding, or untying a transformer.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
  spec = MODELS[name]
  if isinstance(spec, transformer.TransformerSpec):
    if tie_weights is False:
      raise ValueError(f"{name!r} always ties its softmax to its embedding (drop --no-tie-weights)")
    return spec
  if tie_weights is not None:
    spec = dataclasses.replace(spec, tie_weights=tie_weights)
  if spec.tie_weights and spec.hidden_sizes[-1] != spec.embed_size:
    raise ValueError(
      f"cannot tie the weights of {name!r}: its last layer has {spec.hidden_sizes[-1]} units, its "
      f"embedding {spec.embed_size}"
    )
  return spec


def _symmetric_uniform(scale: float) -> jax.nn.initializers.Initializer:
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)

  return init


def _einsum(subscripts: str, x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """``jnp.einsum(subscripts, x, w)`` computed in ``dtype``, returned in float32.

  In float32 it is the plain product. In bfloat16 or float16 the operands are rounded to ``dtype``
  and so is the result before it is widened (XLA:CPU runs no bfloat16 product with a float32
  result inside a loop; accelerators accumulate in float32 either way).
  """
  if dtype == jnp.float32:
    return jnp.einsum(subscripts, x, w)
  return jnp.einsum(subscripts, x.astype(dtype), w.astype(dtype)).astype(jnp.float32)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None, *, locked: bool) -> jax.Array:
  """Inverted dropout of a (batch, time, features) array; ``locked`` shares the mask over time."""
  if key is None or rate == 0.0:
    return x
  shape = (x.shape[0], 1, x.shape[2]) if locked else x.shape
  keep = jax.random.bernoulli(key, 1.0 - rate, shape)
  return x * keep.astype(x.dtype) / (1.0 - rate)


class LSTMLayer(nnx.Module):
  """One LSTM layer over a (batch, time, features) window, carrying ``(h, c)`` (float32).

  ``dtype`` is the dtype of the operands of its matrix products (see the module's docstring).
  """

  def __init__(
    self,
    in_features: int,
    hidden: int,
    init_scale: float | None,
    *,
    rngs: nnx.Rngs,
    dtype: jax.typing.DTypeLike = jnp.float32,
  ):
    scale = 1.0 / math.sqrt(hidden) if init_scale is None else init_scale
    init = _symmetric_uniform(scale)
    self.hidden = hidden
    self.dtype = jnp.dtype(dtype)
    self.w_ih = nnx.Param(init(rngs.params(), (in_features, 4 * hidden)))
    self.w_hh = nnx.Param(init(rngs.params(), (hidden, 4 * hidden)))
    # PyTorch's LSTM has two bias vectors (b_ih + b_hh); one suffices: their sum is what acts.
    self.bias = nnx.Param(init(rngs.params(), (4 * hidden,)))

  def __call__(
    self,
    x: jax.Array,
    carry: tuple[jax.Array, jax.Array],
    *,
    weight_dropout: float = 0.0,
    key: jax.Array | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    w_hh = self.w_hh[...]
    if key is not None and weight_dropout > 0.0:
      # DropConnect: one mask on the recurrent matrix for the whole window (AWD-LSTM).
      keep = jax.random.bernoulli(key, 1.0 - weight_dropout, w_hh.shape)
      w_hh = w_hh * keep.astype(w_hh.dtype) / (1.0 - weight_dropout)
    projected = _einsum("btf,fg->tbg", x, self.w_ih[...], self.dtype) + self.bias[None, None, :]
    w_hh = w_hh.astype(self.dtype)

    def step(state, xw):
      h, c = state
      gates = xw + _einsum("bh,hg->bg", h, w_hh, self.dtype)
      i, f, g, o = jnp.split(gates, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (h, c), h

    carry, hs = jax.lax.scan(step, carry, projected)
    return jnp.swapaxes(hs, 0, 1), carry


class LSTMLanguageModel(nnx.Module):
  """Embedding, stacked LSTM layers and a softmax over the vocabulary.

  ``dtype`` is the dtype of the operands of the matrix products (see the module's docstring).
  """

  def __init__(
    self,
    spec: ModelSpec,
    vocab_size: int,
    *,
    rngs: nnx.Rngs,
    dtype: jax.typing.DTypeLike = jnp.float32,
  ):
    self.spec = spec
    self.vocab_size = vocab_size
    self.dtype = jnp.dtype(dtype)
    self.embedding = nnx.Param(
      _symmetric_uniform(spec.embed_init)(rngs.params(), (vocab_size, spec.embed_size))
    )
    sizes = (spec.embed_size, *spec.hidden_sizes)
    self.layers = nnx.List(
      [
        LSTMLayer(sizes[k], sizes[k + 1], spec.init_scale, rngs=rngs, dtype=dtype)
        for k in range(spec.num_layers)
      ]
    )
    last = spec.hidden_sizes[-1]
    if spec.tie_weights:
      self.softmax_w = None
    else:
      scale = 1.0 / math.sqrt(last) if spec.init_scale is None else spec.init_scale
      self.softmax_w = nnx.Param(_symmetric_uniform(scale)(rngs.params(), (last, vocab_size)))
    if spec.init_scale is None:
      self.softmax_b = nnx.Param(jnp.zeros((vocab_size,), jnp.float32))
    else:
      self.softmax_b = nnx.Param(_symmetric_uniform(spec.init_scale)(rngs.params(), (vocab_size,)))

  def zero_carry(self, batch_size: int) -> Carry:
    return zero_carry(self.spec, batch_size)

  def __call__(
    self, tokens: jax.Array, carry: Carry, *, rng: jax.Array | None = None
  ) -> tuple[jax.Array, Carry]:
    """Logits for the next token at every position of a window, and the carry after it.

    Args:
      tokens: (batch, time) int token ids.
      carry: the state after the previous window (:func:`zero_carry` at the start of a stream).
      rng: a key to train with dropout, or None for the deterministic model.

    Returns:
      (batch, time, vocab) float32 logits and the new carry.
    """
    spec = self.spec
    keys = [None] * (3 + 2 * spec.num_layers)
    if rng is not None:
      keys = list(jax.random.split(rng, len(keys)))
    embedding = self.embedding[...]
    if keys[0] is not None and spec.dropout_embed > 0.0:
      keep = jax.random.bernoulli(keys[0], 1.0 - spec.dropout_embed, (embedding.shape[0], 1))
      embedding = embedding * keep.astype(embedding.dtype) / (1.0 - spec.dropout_embed)
    x = jnp.take(embedding, tokens, axis=0)
    x = _dropout(x, spec.dropout_input, keys[1], locked=spec.locked_dropout)
    new_carry = []
    for k, layer in enumerate(self.layers):
      x, state = layer(x, carry[k], weight_dropout=spec.dropout_weight, key=keys[3 + 2 * k])
      new_carry.append(state)
      last = k == spec.num_layers - 1
      rate = spec.dropout_output if last else spec.dropout_hidden
      x = _dropout(x, rate, keys[2] if last else keys[4 + 2 * k], locked=spec.locked_dropout)
    w = self.embedding[...].T if self.softmax_w is None else self.softmax_w[...]
    logits = _einsum("bth,hv->btv", x, w, self.dtype) + self.softmax_b[None, None, :]
    return logits, tuple(new_carry)


def zero_carry(spec: ModelSpec, batch_size: int) -> Carry:
  """The all-zero ``(h, c)`` of every layer for ``batch_size`` sequences (float32)."""
  return tuple(
    (jnp.zeros((batch_size, h), jnp.float32), jnp.zeros((batch_size, h), jnp.float32))
    for h in spec.hidden_sizes
  )


def create_model(
  name: str,
  vocab_size: int,
  *,
  rngs: nnx.Rngs,
  tie_weights: bool | None = None,
  dtype: jax.typing.DTypeLike = jnp.float32,
) -> LSTMLanguageModel | transformer.TransformerLanguageModel:
  """Builds the language model called ``name`` (a key of ``MODELS``).

  Args:
    name: e.g. ``"lstm2-small"``.
    vocab_size: number of word types (10,000 for PTB).
    rngs: random streams; ``params`` initializes the weights.
    tie_weights: override the model's tying of embedding and softmax, or None.
    dtype: the dtype of the matrix products' operands: float32, bfloat16 or float16.

  Returns:
    The model; ``model(tokens, carry, rng=...)`` -> (logits, carry).

  Raises:
    ValueError: for an unknown name; the message lists the valid ones.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = create_model("lstm2-tiny", 50, rngs=nnx.Rngs(0))
    >>> logits, carry = model(jnp.zeros((3, 7), jnp.int32), model.zero_carry(3))
    >>> logits.shape, carry[1][0].shape
    ((3, 7, 50), (3, 32))
  """
  return build(get_spec(name, tie_weights=tie_weights), vocab_size, rngs=rngs, dtype=dtype)


def build(
  spec: ModelSpec | transformer.TransformerSpec,
  vocab_size: int,
  *,
  rngs: nnx.Rngs,
  dtype: jax.typing.DTypeLike = jnp.float32,
) -> LSTMLanguageModel | transformer.TransformerLanguageModel:
  """Builds the language model that ``spec`` describes (see :func:`create_model`)."""
  if isinstance(spec, transformer.TransformerSpec):
    return transformer.TransformerLanguageModel(spec, vocab_size, rngs=rngs, dtype=dtype)
  return LSTMLanguageModel(spec, vocab_size, rngs=rngs, dtype=dtype)


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (``nnx.Param`` leaves)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
