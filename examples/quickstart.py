"""Padam against SGD-momentum, Adam and AMSGrad on scikit-learn's digits, in about a minute.

A small Flax NNX network (64-256-256-10 MLP) trained for 60 epochs with each optimizer
and the same step decay (x0.1 after 50% and 75% of training). Prints a table of final
train loss and test accuracy, and writes the table and a plot of the curves to --out.

    python examples/quickstart.py [--out quickstart_out] [--epochs 60]
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import padam_jax

BATCH = 32


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, hidden: int = 256):
    self.hidden1 = nnx.Linear(64, hidden, rngs=rngs)
    self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.hidden1(x))
    x = nnx.relu(self.hidden2(x))
    return self.out(x)


def optimizers(steps: int) -> dict[str, optax.GradientTransformation]:
  """The four optimizers with the paper's CIFAR-10 hyperparameters and step decay."""

  def decayed(lr):
    return optax.piecewise_constant_schedule(lr, {steps // 2: 0.1, 3 * steps // 4: 0.1})

  return {
      "SGD-momentum": optax.chain(
          optax.add_decayed_weights(5e-4), optax.sgd(decayed(0.1), momentum=0.9)
      ),
      "Adam": optax.chain(optax.add_decayed_weights(1e-4), optax.adam(decayed(1e-3), b2=0.99)),
      "AMSGrad": optax.chain(
          optax.add_decayed_weights(1e-4), optax.amsgrad(decayed(1e-3), b2=0.99)
      ),
      "Padam (p=1/8)": padam_jax.padam(decayed(0.1), p=0.125, weight_decay=5e-4),
  }


def loss_fn(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def accuracy(model, x, y):
  return jnp.mean(jnp.argmax(model(x), axis=-1) == y)


def train(tx, data, epochs: int, seed: int = 0) -> dict[str, list[float]]:
  x_train, y_train, x_test, y_test = data
  model = MLP(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  order = np.random.default_rng(seed)
  history = {"train_loss": [], "test_acc": []}
  for _ in range(epochs):
    perm = order.permutation(len(x_train))
    losses = []
    for i in range(len(perm) // BATCH):
      idx = perm[i * BATCH : (i + 1) * BATCH]
      losses.append(train_step(model, optimizer, x_train[idx], y_train[idx]))
    history["train_loss"].append(float(np.mean(jax.device_get(losses))))
    history["test_acc"].append(float(accuracy(model, x_test, y_test)))
  return history


def plot(histories, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  for name, history in histories.items():
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    ax_loss.plot(epochs, history["train_loss"], label=name)
    ax_acc.plot(epochs, history["test_acc"], label=name)
  ax_loss.set(xlabel="epoch", ylabel="train loss", yscale="log", title="Training loss")
  ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy", ylim=(0.85, 1.0))
  ax_loss.legend()
  fig.suptitle("scikit-learn digits, 64-256-256-10 MLP, lr x0.1 at 50% and 75%")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("quickstart_out"))
  parser.add_argument("--epochs", type=int, default=60)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.epochs < 1:
    parser.error(f"--epochs must be >= 1, got {args.epochs}")

  digits = load_digits()
  x_train, x_test, y_train, y_test = train_test_split(
      (digits.data / 16.0).astype(np.float32),
      digits.target.astype(np.int32),
      test_size=0.2,
      random_state=0,
      stratify=digits.target,
  )
  data = tuple(jnp.asarray(a) for a in (x_train, y_train, x_test, y_test))
  steps = args.epochs * (len(x_train) // BATCH)

  histories, rows = {}, []
  for name, tx in optimizers(steps).items():
    start = time.perf_counter()
    histories[name] = history = train(tx, data, args.epochs, args.seed)
    seconds = time.perf_counter() - start
    quarter = args.epochs // 4
    rows.append(
        f"| {name} | {history['train_loss'][quarter - 1]:.4f} | {history['train_loss'][-1]:.4f} "
        f"| {history['test_acc'][-1]:.4f} | {seconds:.1f} |"
    )
    print(rows[-1], flush=True)

  table = "\n".join(
      [
          f"| optimizer | train loss, epoch {args.epochs // 4} | final train loss "
          f"| final test accuracy | seconds |",
          "|---|---|---|---|---|",
          *rows,
      ]
  )
  args.out.mkdir(parents=True, exist_ok=True)
  command = "python examples/quickstart.py " + " ".join(
      f"--{k} {v}" for k, v in vars(args).items()
  )
  (args.out / "results.md").write_text(
      f"Command: `{command}`\n\n{len(x_train)} training and {len(x_test)} test images, batch "
      f"{BATCH}, {args.epochs} epochs ({steps} steps), seed {args.seed}, "
      f"jax {jax.__version__} on {jax.devices()[0].platform}.\n\n{table}\n"
  )
  plot(histories, args.out / "curves.png")
  print(f"\n{table}\n\nwrote {args.out / 'results.md'} and {args.out / 'curves.png'}")


if __name__ == "__main__":
  main()
