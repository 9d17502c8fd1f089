"""Penn Treebank language modelling as a :class:`examples.training.Task`, and :func:`train_and_evaluate`.

Training is truncated back-propagation through time: the training stream is cut into
``batch_size`` contiguous rows and windows of ``bptt`` steps (``input_pipeline.bptt_windows``),
taken in order; the LSTM state at the end of one window starts the next (the shared loop stops its
gradient) and is reset to zero at the start of every epoch. The loss of a step is the mean
cross-entropy over its ``batch_size x bptt`` tokens (as PyTorch's and AWD-LSTM's trainers, not the
per-sequence sum of Zaremba's TensorFlow code, whose learning rates are therefore not comparable).

Evaluation scores every (input, target) pair of the validation and test streams exactly once: the
stream is cut into ``eval_batch_size`` rows, each starting from a zero state and carrying it across
its windows, with the tail padded at weight 0. Perplexity is ``exp(total loss / tokens)`` over the
whole stream; ``--eval-batch-size 1`` gives the single-sequence value.

A transformer (``--model transformer-small``, :class:`TransformerTask`) carries no state: the
training stream is cut into windows of ``bptt`` (its context) tokens that do not overlap, shuffled
anew every epoch and taken ``batch_size`` at a time; each window is read from its own start.
Evaluation cuts the validation and test streams as for an LSTM but starts every window from
nothing, so each pair is scored once, with the context its window gives it (0 to ``bptt - 1``
tokens): these perplexities compare optimizers on one model, not models.

The optimizer is the registry's for task ``ptb2`` (two-layer LSTMs), ``ptb3`` (three layers) or
``lm`` (transformers), after ``optax.clip_by_global_norm``. For AdamW's normalized weight decay, an epoch's "training
examples" are its ``batch_size x steps`` sequences of ``bptt`` tokens, so that
``batch / examples`` is ``1 / steps``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from examples import cli, training
from examples.ptb import input_pipeline, models, transformer


@dataclasses.dataclass(frozen=True)
class Config(training.LoopConfig):
  """A PTB run. The shared fields (optimizer, epochs, ...) are those of ``LoopConfig``.

  Each field's ``metadata["help"]`` says what it means (the help of its flag); None for ``bptt``,
  ``clip`` or ``tie_weights`` takes the model's value.
  """

  model: str = cli.setting(
    "lstm2-small", choices=models.MODELS, metavar="MODEL", help=lambda: f"network: {_model_help()}"
  )
  epochs: int = 200
  batch_size: int = 20
  bptt: int | None = cli.setting(
    None,
    help="steps per truncated-BPTT window, or a transformer's window (at most its context) "
    "(default: the model's)",
  )
  clip: float | None = cli.setting(
    None, help="clip the gradient to this global norm, 0 for none (default: the model's)"
  )
  tie_weights: bool | None = cli.setting(
    None, help="share the embedding and softmax matrices (default: the model's)"
  )
  train_tokens: int | None = cli.setting(
    None, help="train on the first N tokens of the training stream only (quick runs; default: all)"
  )
  eval_batch_size: int = cli.setting(
    10, help="rows the valid/test streams are cut into; 1 scores them as one sequence"
  )
  data_dir: str | None = cli.setting(
    None,
    help="folder holding ptb.{train,valid,test}.txt (default: $PADAM_DATA_DIR, else download to "
    "the cache)",
  )

  def check_values(self) -> None:
    super().check_values()
    cli.check_int("--eval-batch-size", self.eval_batch_size, minimum=1)
    cli.check_int("--bptt", self.bptt, minimum=1, optional=True)
    cli.check_int("--train-tokens", self.train_tokens, minimum=2, optional=True)
    if self.clip is not None:
      cli.check_number("--clip", self.clip, minimum=0)


def _model_help() -> str:
  rows = []
  for name, spec in models.MODELS.items():
    if isinstance(spec, transformer.TransformerSpec):
      rows.append(f"{name} ({spec.describe()})")
      continue
    sizes = "x".join(str(h) for h in spec.hidden_sizes)
    rows.append(
      f"{name} (embed {spec.embed_size}, LSTM {sizes}, bptt {spec.bptt}, clip {spec.clip})"
    )
  return "; ".join(rows)


def registry_task(spec: models.ModelSpec | transformer.TransformerSpec) -> str:
  """The optimizer registry's task of a model: ``lm`` for a transformer, ``ptb3`` for an LSTM of 3
  or more layers, else ``ptb2``."""
  if isinstance(spec, transformer.TransformerSpec):
    return "lm"
  return "ptb3" if spec.num_layers >= 3 else "ptb2"


def check_window(spec: models.ModelSpec | transformer.TransformerSpec, bptt: int | None) -> None:
  """Raises ValueError for a ``--bptt`` longer than a transformer's context."""
  if isinstance(spec, transformer.TransformerSpec) and bptt is not None and bptt > spec.context:
    raise ValueError(
      f"--bptt {bptt} is not valid for a transformer of context {spec.context}; expected at most "
      f"{spec.context}"
    )


def _perplexity(loss: float) -> float:
  # exp overflows a float above ~709.8 nats per token; such a run has diverged anyway.
  return math.exp(loss) if loss < 709.0 else math.inf


class PtbTask(training.Task):
  """Next-word prediction on PTB with an LSTM, truncated BPTT with carried state."""

  unit = "tokens"

  def __init__(self, config: Config, corpus: input_pipeline.Corpus):
    self.spec = models.get_spec(config.model, tie_weights=config.tie_weights)
    self.registry_task = registry_task(self.spec)
    self.bptt = self.spec.bptt if config.bptt is None else config.bptt
    self.clip = self.spec.clip if config.clip is None else config.clip
    self.corpus = corpus
    self.dtype = jnp.dtype(config.dtype)
    self.vocab_size = len(corpus.vocab)
    self.chance_loss = math.log(self.vocab_size)
    self.batch_size = config.batch_size
    self.eval_batch_size = config.eval_batch_size
    self.test_every = config.test_every
    self.steps_per_epoch = self._cut_training_stream(np.asarray(corpus.train))
    self.train_size = self.steps_per_epoch * config.batch_size
    self._eval_windows: dict[str, input_pipeline.Windows] | None = None
    arrays = {"vocab": np.frombuffer("\n".join(corpus.vocab).encode(), np.uint8)}
    arrays.update({split: np.asarray(getattr(corpus, split)) for split in input_pipeline.SPLITS})
    self._data = {
      "files": [f"ptb.{split}.txt" for split in input_pipeline.SPLITS],
      "sha256": training.fingerprint(arrays),
    }

  def _cut_training_stream(self, tokens: np.ndarray) -> int:
    """Cuts the training stream into this model's training windows; returns the steps per epoch."""
    self.train_windows = input_pipeline.bptt_windows(tokens, self.batch_size, self.bptt, pad=False)
    return int(self.train_windows.inputs.shape[0])

  def describe_data(self) -> dict[str, Any]:
    """The three files and the SHA-256 of the vocabulary and the token streams used."""
    return self._data

  def init_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return models.build(self.spec, self.vocab_size, rngs=rngs, dtype=self.dtype)

  def transform(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    if self.clip == 0:
      return tx
    return optax.chain(optax.clip_by_global_norm(self.clip), tx)

  def init_carry(self, batch_size: int) -> models.Carry:
    return models.zero_carry(self.spec, batch_size)

  def train_batches(
    self, epoch: int, rng: jax.Array, start: int = 0
  ) -> Iterator[dict[str, np.ndarray]]:
    del epoch, rng  # every epoch walks the same windows in order; only dropout is random
    windows = self.train_windows
    for w in range(start, self.steps_per_epoch):
      yield {"inputs": windows.inputs[w], "targets": windows.targets[w]}

  def train_data(self) -> dict[str, np.ndarray]:
    """Every training window, to live on the devices (the same windows, in order, every epoch)."""
    return {"inputs": self.train_windows.inputs, "targets": self.train_windows.targets}

  def train_batch(self, data, order, step) -> dict[str, jax.Array]:
    del order
    return {"inputs": data["inputs"][step], "targets": data["targets"][step]}

  def loss(self, model, batch, carry, rng, *, train: bool):
    logits, carry = model(batch["inputs"], carry, rng=rng if train else None)
    targets = batch["targets"]
    weight = batch.get("weights", jnp.ones(targets.shape, jnp.float32))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    sums = {"loss": jnp.sum(losses * weight), "count": jnp.sum(weight)}
    return sums["loss"] / sums["count"], (carry, sums)

  def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
    loss = sums["loss"] / sums["count"]
    return {"loss": loss, "ppl": _perplexity(loss)}

  def evaluation_windows(self, num_devices: int = 1) -> dict[str, input_pipeline.Windows]:
    """The valid and test windows (rows rounded up to a multiple of ``num_devices``)."""
    if self._eval_windows is None:
      rows = -(-self.eval_batch_size // num_devices) * num_devices
      self._eval_windows = {
        split: input_pipeline.bptt_windows(getattr(self.corpus, split), rows, self.bptt, pad=True)
        for split in ("valid", "test")
      }
    return self._eval_windows

  def evaluate(self, evaluator: training.Evaluator) -> dict[str, float]:
    record = {}
    for split, windows in self.evaluation_windows(evaluator.num_devices).items():
      if split == "test" and not evaluator.due(self.test_every):
        continue
      batches = (
        {"inputs": windows.inputs[w], "targets": windows.targets[w], "weights": windows.weights[w]}
        for w in range(windows.inputs.shape[0])
      )
      sums = evaluator.run(batches, self.init_carry(windows.inputs.shape[1]))
      loss = sums["loss"] / sums["count"]
      record[f"{split}_loss"] = loss
      record[f"{split}_ppl"] = _perplexity(loss)
    return record


class TransformerTask(PtbTask):
  """Next-word prediction on PTB with a transformer: independent windows, shuffled every epoch."""

  weight_decay_mask = staticmethod(transformer.decay_mask)

  def _cut_training_stream(self, tokens: np.ndarray) -> int:
    """Cuts the training stream into windows of the context length, to be shuffled every epoch."""
    length = self.bptt
    count = (tokens.size - 1) // length  # windows of ``length`` (input, target) pairs
    steps = count // self.batch_size
    if steps < 1:
      raise ValueError(
        f"batch size {self.batch_size} exceeds the {count} windows of {length} tokens of the "
        "training stream"
      )
    self._windows = {
      "inputs": tokens[: count * length].reshape(count, length),
      "targets": tokens[1 : count * length + 1].reshape(count, length),
    }
    return steps

  def init_carry(self, batch_size: int) -> None:
    del batch_size
    return None

  def train_data(self) -> dict[str, np.ndarray]:
    """Every window of the training stream, to live on the devices."""
    return self._windows

  def epoch_order(self, epoch_key: jax.Array) -> jax.Array:
    """A permutation of the windows, new every epoch (those past the last whole batch wait)."""
    return jax.random.permutation(epoch_key, self._windows["inputs"].shape[0])

  def train_batch(self, data, order, step) -> dict[str, jax.Array]:
    index = jax.lax.dynamic_slice_in_dim(order, step * self.batch_size, self.batch_size)
    return {"inputs": data["inputs"][index], "targets": data["targets"][index]}

  # The windows in this epoch's order, one batch at a time (not the LSTM's windows in order).
  train_batches = training.Task.train_batches


def make_task(config: Config, corpus: input_pipeline.Corpus) -> PtbTask:
  """The task of ``config``'s model: a :class:`TransformerTask` or an LSTM's :class:`PtbTask`."""
  spec = models.get_spec(config.model, tie_weights=config.tie_weights)
  if isinstance(spec, transformer.TransformerSpec):
    return TransformerTask(config, corpus)
  return PtbTask(config, corpus)


def train_and_evaluate(
  config: Config, corpus: input_pipeline.Corpus | None = None
) -> list[dict[str, Any]]:
  """Trains a language model on PTB as ``config`` says; returns the per-epoch records.

  Args:
    config: the run's settings.
    corpus: the encoded corpus, or None to load it from ``config.data_dir`` (tests pass their own).

  Returns:
    One dict per epoch with ``epoch``, ``step``, ``lr``, ``train_loss``, ``train_ppl``,
    ``valid_loss``, ``valid_ppl``, ``test_loss``, ``test_ppl``, ``epoch_seconds``,
    ``tokens_per_second`` and a few more (as in ``WORKDIR/metrics.jsonl``).

  Raises:
    ValueError: for an unknown model or optimizer name (listing the valid ones), or bad settings.
    input_pipeline.DataError: for missing or inconsistent data.
  """
  # The config has checked its values when it was made; fail on a model that cannot be tied, and
  # on the rest (devices, hyperparameters, the workdir and what it holds), before spending seconds
  # on reading the data.
  spec = models.get_spec(config.model, tie_weights=config.tie_weights)
  check_window(spec, config.bptt)
  config = training.check_run(config, registry_task(spec))
  if corpus is None:
    corpus = input_pipeline.load(config.data_dir, config.train_tokens)
  elif config.train_tokens is not None:
    corpus = corpus._replace(train=corpus.train[: config.train_tokens])
  return training.train(make_task(config, corpus), config)
