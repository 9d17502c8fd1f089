"""CIFAR-10 classification as a :class:`examples.training.Task`, and :func:`train_and_evaluate`.

The dataset lives on the device; each step gathers its batch there and augments it inside the jitted
step (random crop with 4-pixel zero padding, horizontal flip), so the input pipeline costs next to
nothing. An epoch is ``train_size // batch_size`` steps over a fresh permutation (the remainder of
the permutation is skipped, so every batch has the same shape); evaluation covers the whole test set.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from examples import cli, training
from examples.cifar10 import input_pipeline, models


@dataclasses.dataclass(frozen=True)
class Config(training.LoopConfig):
  """A CIFAR-10 run. The shared fields (optimizer, epochs, ...) are those of ``LoopConfig``.

  Each field's ``metadata["help"]`` says what it means (the help of its flag).
  """

  model: str = cli.setting(
    "resnet20",
    choices=models.MODELS,
    metavar="MODEL",
    help=lambda: f"network: {', '.join(models.MODELS)}",
  )
  epochs: int = 200
  train_size: int | None = cli.setting(
    None, help="class-balanced, seeded subset of the 50,000 training images"
  )
  test_size: int | None = cli.setting(
    None, help="class-balanced, seeded subset of the 10,000 test images"
  )
  data_dir: str | None = cli.setting(
    None,
    help="folder holding cifar10.npz (default: $PADAM_DATA_DIR, else download to the cache)",
  )
  val_size: int | None = cli.setting(
    None,
    help="hold out a class-balanced, seeded validation split of this many training images "
    "(disjoint from the training subset), evaluated as val_loss/val_acc",
  )
  eval_batch_size: int = cli.setting(
    1000, help="evaluation batch (rounded up to a multiple of the devices)"
  )

  def check_values(self) -> None:
    super().check_values()
    cli.check_int("--eval-batch-size", self.eval_batch_size, minimum=1)
    cli.check_int("--train-size", self.train_size, minimum=1, optional=True)
    cli.check_int("--test-size", self.test_size, minimum=1, optional=True)
    cli.check_int("--val-size", self.val_size, minimum=1, optional=True)
    # CIFAR-10's sizes, checked before the data are read (a smaller file is checked once read).
    train, test = input_pipeline.TRAIN_IMAGES, input_pipeline.TEST_IMAGES
    for flag, value, most, split in (
      ("--train-size", self.train_size, train, "training"),
      ("--val-size", self.val_size, train, "training"),
      ("--test-size", self.test_size, test, "test"),
    ):
      if value is not None and value > most:
        raise ValueError(
          f"{flag} {value} is not valid; CIFAR-10 has {most:,} {split} images (expected 1..{most})"
        )
    if self.val_size is not None and (self.train_size or 0) + self.val_size > train:
      raise ValueError(
        f"--train-size {self.train_size} and --val-size {self.val_size} are not valid together; "
        f"they are drawn from CIFAR-10's {train:,} training images, and add up to more"
      )


class Cifar10Task(training.Task):
  """CIFAR-10 with the reference's augmentation and normalization, cross-entropy loss."""

  registry_task = "cifar10"
  unit = "images"
  chance_loss = math.log(10)

  def __init__(
    self,
    config: Config,
    train: input_pipeline.Split,
    test: input_pipeline.Split,
    val: input_pipeline.Split | None = None,
  ):
    self.model_name = config.model
    self.test_every = config.test_every
    self.dtype = jnp.dtype(config.dtype)
    self.batch_size = config.batch_size
    self.eval_batch_size = config.eval_batch_size
    self.train_size = int(train.labels.shape[0])
    self.steps_per_epoch = self.train_size // config.batch_size
    if self.steps_per_epoch < 1:
      raise ValueError(
        f"batch size {config.batch_size} exceeds the {self.train_size} training images"
      )
    self._train = train
    self.splits = {"test": test} if val is None else {"val": val, "test": test}
    self._eval_batches: dict[str, list[dict[str, jax.Array]]] = {}
    arrays = {"x_train": train.images, "y_train": train.labels}
    for name, split in self.splits.items():
      arrays |= {f"x_{name}": split.images, f"y_{name}": split.labels}
    # Without a validation split the arrays (and so the fingerprint) are those of earlier runs.
    self._data = {"files": [input_pipeline.NPZ_NAME], "sha256": training.fingerprint(arrays)}

  def describe_data(self) -> dict[str, Any]:
    """``cifar10.npz`` and the SHA-256 of the training and test arrays used (subsets included)."""
    return self._data

  def init_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return models.create_model(self.model_name, rngs=rngs, dtype=self.dtype)

  def train_data(self) -> dict[str, np.ndarray]:
    """The training images (uint8) and labels, to live on the devices."""
    return {"image": self._train.images, "label": self._train.labels}

  def epoch_order(self, epoch_key: jax.Array) -> jax.Array:
    """A permutation of the training images, new every epoch."""
    return jax.random.permutation(epoch_key, self.train_size)

  def train_batch(self, data, order, step) -> dict[str, jax.Array]:
    index = jax.lax.dynamic_slice_in_dim(order, step * self.batch_size, self.batch_size)
    return {"image": data["image"][index], "label": data["label"][index]}

  def loss(self, model, batch, carry, rng, *, train: bool):
    images = batch["image"]
    if train:
      images = input_pipeline.random_crop_flip(images, rng)
    logits = model(input_pipeline.normalize(images))
    labels = batch["label"]
    # Evaluation batches are padded to one shape; the weight is 0 on padding.
    weight = batch.get("weight", jnp.ones(labels.shape, jnp.float32))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    sums = {
      "loss": jnp.sum(losses * weight),
      "correct": jnp.sum(correct * weight),
      "count": jnp.sum(weight),
    }
    return sums["loss"] / sums["count"], (carry, sums)

  def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
    return {"loss": sums["loss"] / sums["count"], "acc": sums["correct"] / sums["count"]}

  def evaluate(self, evaluator: training.Evaluator) -> dict[str, float]:
    """``val_loss``/``val_acc`` (with a validation split) and, when due, ``test_loss``/``test_acc``."""
    record = {}
    for name, split in self.splits.items():
      if name == "test" and not evaluator.due(self.test_every):
        continue
      if name not in self._eval_batches:
        self._eval_batches[name] = _padded_batches(
          split, self.eval_batch_size, evaluator.num_devices
        )
      sums = evaluator.run(self._eval_batches[name])
      record[f"{name}_loss"] = sums["loss"] / sums["count"]
      record[f"{name}_acc"] = sums["correct"] / sums["count"]
    return record


def _padded_batches(
  split: input_pipeline.Split, batch_size: int, num_devices: int
) -> list[dict[str, jax.Array]]:
  n = split.labels.shape[0]
  batch_size = min(batch_size, n)
  batch_size = -(-batch_size // num_devices) * num_devices
  total = -(-n // batch_size) * batch_size
  pad = total - n
  images = np.concatenate([split.images, np.zeros((pad, *split.images.shape[1:]), np.uint8)])
  labels = np.concatenate([split.labels, np.zeros((pad,), np.int32)])
  weight = np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])
  return [
    {
      "image": jnp.asarray(images[i : i + batch_size]),
      "label": jnp.asarray(labels[i : i + batch_size]),
      "weight": jnp.asarray(weight[i : i + batch_size]),
    }
    for i in range(0, total, batch_size)
  ]


def train_and_evaluate(config: Config) -> list[dict[str, Any]]:
  """Trains on CIFAR-10 as ``config`` says; returns the per-epoch records (as in metrics.jsonl).

  Args:
    config: the run's settings.

  Returns:
    One dict per epoch with ``epoch``, ``step``, ``lr``, ``train_loss``, ``train_acc``,
    ``test_loss``, ``test_acc``, ``epoch_seconds``, ``images_per_second`` and a few more.
  """
  # The config has checked its values when it was made; the rest (devices, hyperparameters, the
  # workdir and what it holds) is checked here, before the data load and the model compile.
  config = training.check_run(config, Cifar10Task.registry_task)
  train, test, val = input_pipeline.load_splits(
    config.data_dir, config.train_size, config.test_size, config.seed, val_size=config.val_size
  )
  return training.train(Cifar10Task(config, train, test, val), config)
