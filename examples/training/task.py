"""What a trainer describes: a :class:`Task` (model, batches, loss, evaluation), and the
:class:`Evaluator` its evaluation drives."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Batch = Any  # a pytree of arrays whose leading axis is the batch (sharded over "data")
Carry = Any  # a pytree of arrays whose leading axis is the batch, or None
Sums = dict[str, jax.Array]  # per-step metric sums, e.g. {"loss": sum, "correct": n, "count": n}


class Evaluator:
  """Runs the jitted evaluation step over the batches a task gives it.

  Attributes:
    num_devices: devices the batch axis is split over; every batch's size must be a multiple.
    epoch: the epoch just trained (0 when not known).
    final: whether it is the run's last epoch (``epochs``).
  """

  def __init__(
    self,
    step: Callable[..., tuple[Carry, Sums]],
    state: Any,
    shard: Callable[[Any], Any],
    num_devices: int,
    *,
    epoch: int = 0,
    final: bool = False,
  ):
    self._step = step
    self._state = state
    self._shard = shard
    self.num_devices = num_devices
    self.epoch = epoch
    self.final = final

  def due(self, every: int | None) -> bool:
    """Whether an evaluation held to every ``every`` epochs (None: every one) runs now: on those
    epochs and after the last."""
    return every is None or self.final or self.epoch % every == 0

  def run(self, batches: Iterable[Batch], carry: Carry = None) -> dict[str, float]:
    """Sums the task's metric sums over ``batches`` (in eval mode), threading ``carry`` through.

    Args:
      batches: the batches of one evaluation stream, in order.
      carry: the initial carried state (e.g. a zero LSTM state), or None.

    Returns:
      The summed metrics, as Python floats.
    """
    totals = None
    carry = self._shard(carry)
    for batch in batches:
      carry, sums = self._step(self._state, carry, self._shard(batch))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
      raise ValueError("evaluation got no batches")
    return {k: float(v) for k, v in totals.items()}


class Task:
  """A training problem for :func:`examples.training.train`. Subclass it and fill in the methods.

  Attributes (set by the subclass):
    registry_task: the optimizer registry's task (``"cifar10"``, ``"ptb2"``, ``"ptb3"``, ``"lm"``):
      it picks the hyperparameters.
    unit: what the batches hold, for throughput: ``"images"`` logs ``images_per_second``.
    steps_per_epoch: number of batches in an epoch (:meth:`train_batches` or :meth:`train_batch`).
    train_size: training examples per epoch (AdamW's normalized weight decay uses it).
    weight_decay_mask: which parameters a decoupled weight decay applies to (a function of the
      parameters returning a pytree of bools), for a registry task that decays so (``lm``); None:
      the registry's default.
    chance_loss: the loss of a uniform prediction (the log of the number of classes), or None; a
      training or evaluation loss above 1,000 times it stops the run as diverged (exit status 3).
  """

  registry_task: str
  unit: str = "examples"
  steps_per_epoch: int
  train_size: int
  weight_decay_mask: Any = None
  chance_loss: float | None = None

  def init_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model; it is in training mode (``train()``) for steps and ``eval()`` for evaluation."""
    raise NotImplementedError

  def transform(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """The registry's optimizer as the task uses it (e.g. ``chain(clip_by_global_norm(c), tx)``)."""
    return tx

  def init_carry(self, batch_size: int) -> Carry:
    """The carried state at the start of each epoch (e.g. zero LSTM states), or None."""
    del batch_size
    return None

  def train_batches(self, epoch: int, rng: jax.Array, start: int = 0) -> Iterator[Batch]:
    """Yields the training batches ``start``, ..., ``steps_per_epoch - 1`` of ``epoch`` (1-based),
    each of ``batch_size``.

    ``rng`` is derived from the seed and the epoch only, so the same epoch always gets the same
    batches in the same order, and a run resumed inside an epoch (``start`` > 0) gets the rest of
    them (exact resumption depends on it).

    A task that gives :meth:`train_data` needs no other: the loop cuts its batches on the devices,
    and this default yields the same batches one at a time, for code that steps by hand.
    """
    del epoch  # the rng already depends on it
    data = self.train_data()
    if data is None:
      raise NotImplementedError
    data = jax.tree.map(jnp.asarray, data)
    order = self.epoch_order(rng)
    batch = jax.jit(self.train_batch)
    for step in range(start, self.steps_per_epoch):
      yield batch(data, order, jnp.int32(step))

  def train_data(self) -> Any | None:
    """The arrays every epoch's batches are cut from, placed on the devices once (replicated), or
    None (the default) when :meth:`train_batches` yields the batches from the host.

    A task that gives them implements :meth:`epoch_order` and :meth:`train_batch`: the loop then
    cuts each batch inside the compiled step and runs several steps per call
    (``--steps-per-call``), with no work on the host between them.
    """
    return None

  def epoch_order(self, epoch_key: jax.Array) -> Any:
    """Traced on the devices: what orders ``epoch``'s batches (e.g. a permutation), from the
    epoch's key; None when the order never changes."""
    del epoch_key
    return None

  def train_batch(self, data: Any, order: Any, step: jax.Array) -> Batch:
    """Traced inside the compiled step: batch ``step`` (0-based, a traced int32) of the epoch, cut
    from :meth:`train_data`'s arrays in :meth:`epoch_order`'s order. It must equal the batch
    :meth:`train_batches` yields at ``step``."""
    raise NotImplementedError

  def loss(
    self, model: nnx.Module, batch: Batch, carry: Carry, rng: jax.Array, *, train: bool
  ) -> tuple[jax.Array, tuple[Carry, Sums]]:
    """The scalar loss to minimise, the next carry, and this batch's metric sums.

    Called inside ``jax.jit``. ``sums`` must include ``"count"`` (images or tokens in the batch: the
    throughput counts it) and is summed over the steps of an epoch or an evaluation stream.
    ``train`` is False for evaluation (the model is then in eval mode). The loop stops gradients
    through the returned carry.
    """
    raise NotImplementedError

  def checkpoint_state(self) -> dict[str, Any]:
    """Task state to save with each checkpoint (JSON-serialisable); none by default."""
    return {}

  def restore_checkpoint_state(self, state: Mapping[str, Any]) -> None:
    """Restores what :meth:`checkpoint_state` saved, when a run resumes."""
    del state

  def describe_data(self) -> dict[str, Any] | None:
    """What identifies the data: ``{"files": [...], "sha256": fingerprint(arrays used)}``, or None.

    Recorded in run.json and each checkpoint; ``--resume`` refuses other data (same SHA-256).
    """
    return None

  def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
    """Turns an epoch's summed training metrics into the logged ones (``loss`` -> ``train_loss``).

    The default divides every sum by ``count``.
    """
    count = sums["count"]
    return {k: v / count for k, v in sums.items() if k != "count"}

  def evaluate(self, evaluator: Evaluator) -> dict[str, float]:
    """The end-of-epoch evaluation, logged as is (e.g. ``{"test_loss": ..., "test_acc": ...}``)."""
    raise NotImplementedError
