"""Padam against SGD-momentum, Adam and AMSGrad on scikit-learn's digits, in about a minute.

A small Flax NNX network (64-256-256-10 MLP) trained for 60 epochs with each optimizer, built by
the examples' registry (:func:`examples.optimizers.make_optimizer`) with the paper's CIFAR-10
hyperparameters and step decay (x0.1 after 50% and 75% of training). Prints a table of train loss
and test accuracy, and writes the table and a plot of the curves to --out.

    python -m examples.quickstart [--out quickstart_out] [--epochs 60] [--seed 0]

(``python examples/quickstart.py`` runs it too.) Needs the ``examples`` extra:
``pip install -e ".[examples]"``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

try:
  import matplotlib
  from flax import nnx
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
except ImportError as error:  # the examples extra is not installed
  sys.exit(f'the quickstart needs {error.name}: pip install -e ".[examples]"')

import jax
import jax.numpy as jnp
import numpy as np
import optax

from examples import optimizers as registry

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


# Table label -> registry name; each takes the registry's CIFAR-10 hyperparameters.
OPTIMIZERS = {
  "SGD-momentum": "sgdm",
  "Adam": "adam",
  "AMSGrad": "amsgrad",
  "Padam (p=1/8)": "padam",
}


def optimizers(
  steps_per_epoch: int, epochs: int, train_size: int
) -> dict[str, optax.GradientTransformation]:
  """The four optimizers from the registry: the paper's CIFAR-10 hyperparameters and step decay."""
  return {
    label: registry.make_optimizer(
      name,
      "cifar10",
      steps_per_epoch=steps_per_epoch,
      epochs=epochs,
      batch_size=BATCH,
      train_size=train_size,
    ).tx
    for label, name in OPTIMIZERS.items()
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


def machine() -> str:
  """The CPU, its widest vector instruction set and its core count.

  XLA:CPU compiles for the host's instruction set, so a float32 result can differ in its last
  bits between machines; where training is unstable (SGD-momentum at lr 0.1 before the first
  decay) such bits can change a printed loss.
  """
  model, flags = "unknown CPU", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown CPU":
          model = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  isa = next((name for name in ("avx512f", "avx2", "avx", "neon", "asimd") if name in flags), "")
  return f"{model}{f' ({isa})' if isa else ''}, {os.cpu_count()} cores"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m examples.quickstart", description=__doc__.splitlines()[0]
  )
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=pathlib.Path("quickstart_out"),
    help="folder for results.md and curves.png (default: quickstart_out)",
  )
  parser.add_argument("--epochs", type=int, default=60, help="epochs per optimizer (default: 60)")
  parser.add_argument(
    "--seed",
    type=int,
    default=0,
    help="seed of the initialisation and the batch order (default: 0)",
  )
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
  steps_per_epoch = len(x_train) // BATCH
  steps = args.epochs * steps_per_epoch
  quarter = max(1, args.epochs // 4)

  histories, rows = {}, []
  for name, tx in optimizers(steps_per_epoch, args.epochs, len(x_train)).items():
    start = time.perf_counter()
    histories[name] = history = train(tx, data, args.epochs, args.seed)
    seconds = time.perf_counter() - start
    rows.append(
      f"| {name} | {history['train_loss'][quarter - 1]:.4f} | {history['train_loss'][-1]:.4f} "
      f"| {history['test_acc'][-1]:.4f} | {seconds:.1f} |"
    )
    print(rows[-1], flush=True)

  table = "\n".join(
    [
      f"| optimizer | train loss, epoch {quarter} | final train loss "
      f"| final test accuracy | seconds |",
      "|---|---|---|---|---|",
      *rows,
    ]
  )
  args.out.mkdir(parents=True, exist_ok=True)
  command = "python -m examples.quickstart " + " ".join(f"--{k} {v}" for k, v in vars(args).items())
  (args.out / "results.md").write_text(
    f"Command: `{command}`\n\n{len(x_train)} training and {len(x_test)} test images, batch "
    f"{BATCH}, {args.epochs} epochs ({steps} steps), seed {args.seed}, "
    f"jax {jax.__version__} on {jax.devices()[0].platform}.\n\nMachine: {machine()}.\n\n"
    f"{table}\n"
  )
  plot(histories, args.out / "curves.png")
  print(f"\n{table}\n\nwrote {args.out / 'results.md'} and {args.out / 'curves.png'}")


if __name__ == "__main__":
  main()
