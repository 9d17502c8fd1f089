"""How much a narrow optimizer state moves the update, on the gradients of a real CIFAR-10 run.

    python -m benchmarks.state_replay --data-dir DIR [--gradients FILE] [--json FILE]

Two parts:

- **Recording.** The CIFAR-10 trainer (:func:`examples.training.train` with
  :class:`examples.cifar10.train.Cifar10Task`) trains ResNet-8 on a class-balanced subset of the
  training images with the registry's Padam for ``cifar10`` (p = 1/8, lr 0.1 with its step decay,
  coupled weight decay 5e-4). The task's optimizer is the registry's behind a transformation that
  hands every step's gradient to the host (:func:`recorder`): the run is the trainer's own, and
  the gradients are the ones its optimizer saw, before weight decay. ``--gradients FILE`` keeps
  them in a ``.npz`` file (read instead of training when it exists).
- **Replay.** The same gradient sequence goes through each optimizer with its state in float32 and
  kept narrow: ``mu_dtype`` and ``nu_dtype`` bfloat16 (rounded stochastically), each of the two
  alone, and :func:`padam_jax.with_quantized_state` (8-bit block-wise codes, its defaults). At
  every step the narrow state's update ``u`` is compared with float32's ``u32`` on the same
  gradient: the relative error ``|u - u32| / |u32|`` and the bias ``<u, u32> / |u32|^2 - 1`` over
  the whole parameter tree. The replay is fixed: weight decay is left out (it is coupled, added to
  the gradient before the rule), so the parameters do not enter the update and the float32 and
  narrow runs see the same gradients at every step.

The optimizers share the registry's Padam settings for CIFAR-10 (b1 = 0.9, b2 = 0.999,
eps = 1e-8, lr 0.1; a constant rate scales ``u`` and ``u32`` alike): Padam at p = 1/8, Padam at
p = 1/2 (AMSGrad as the authors ran it) and Adam. ``optax.adam`` has no ``nu_dtype``, so Adam
with a bfloat16 state is :func:`padam_jax.partial_adam` at p = 1/2 (Adam's rule, with ``eps``
added to ``sqrt(v)`` before the bias correction), against the same in float32; the 8-bit Adam is
``optax.adam`` under :func:`padam_jax.with_quantized_state`, against ``optax.adam``.

Besides the update's error, each row gives the error ``d`` of the second moment the update
divides by (``vhat`` for Padam, ``v`` for Adam): per element, the narrow state's value entering
the step against float32's, relative; ``d`` is its root mean square over the elements. A relative
error ``d_i`` of ``vhat_i`` moves that element's step by about ``p * d_i``, so the part of the
update's error that comes from ``vhat`` is about ``p * |d . u32| / |u32|`` (column ``p*d``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import padam_jax
from benchmarks.speed_report import cpu_model
from examples import training
from examples.cifar10 import input_pipeline
from examples.cifar10.train import Cifar10Task, Config
from padam_jax import _quantized

# The recorded run: the registry's Padam for CIFAR-10 on a small ResNet and a subset of the images.
MODEL = "resnet8"
TRAIN_SIZE = 1000
TEST_SIZE = 1000
BATCH_SIZE = 32
EPOCHS = 8
SEED = 0
LAST_STEPS = 50
# The registry's Padam for cifar10 (examples/optimizers.py), weight decay left out.
SETTINGS = {"learning_rate": 0.1, "b1": 0.9, "b2": 0.999, "eps": 1e-8}
# The registry's AMSGrad and Adam for cifar10: b2 = 0.99, lr 1e-3.
REGISTRY_P_HALF = {"learning_rate": 1e-3, "b1": 0.9, "b2": 0.99, "eps": 1e-8}
P_EIGHTH, P_HALF = "Padam, p = 1/8", "Padam, p = 1/2 (AMSGrad)"


# --- Recording -----------------------------------------------------------------------------------


def recorder(sink: Callable[[np.ndarray, list[np.ndarray]], None]) -> optax.GradientTransformation:
  """A transformation that passes its updates on unchanged and calls ``sink(step, leaves)`` on the
  host with the step number (0, 1, ...) and the updates' leaves (``jax.tree.leaves`` order)."""

  def init_fn(params: optax.Params) -> jax.Array:
    del params
    return jnp.zeros([], jnp.int32)

  def update_fn(updates, count, params=None):
    del params
    jax.debug.callback(sink, count, jax.tree.leaves(updates))
    return updates, count + 1

  return optax.GradientTransformation(init_fn, update_fn)


class Recording(NamedTuple):
  """The gradients of a run: one array per parameter leaf, ``(steps, *shape)``, and the leaves'
  names (their paths in the parameter tree)."""

  gradients: list[np.ndarray]
  names: list[str]


class _Sink:
  """Collects the gradients :func:`recorder` hands over, by step."""

  def __init__(self):
    self.steps: dict[int, list[np.ndarray]] = {}
    self._lock = threading.Lock()

  def __call__(self, count: np.ndarray, leaves: list[np.ndarray]) -> None:
    with self._lock:
      self.steps[int(count)] = [np.array(x, np.float32) for x in leaves]

  def stacked(self) -> list[np.ndarray]:
    if sorted(self.steps) != list(range(len(self.steps))):
      raise RuntimeError(f"recorded steps are not 0..n-1: {sorted(self.steps)[:10]}...")
    steps = [self.steps[t] for t in range(len(self.steps))]
    return [np.stack(leaf) for leaf in zip(*steps, strict=True)]


def record_gradients(
  data_dir: str | None,
  *,
  model: str = MODEL,
  train_size: int = TRAIN_SIZE,
  test_size: int = TEST_SIZE,
  batch_size: int = BATCH_SIZE,
  epochs: int = EPOCHS,
  seed: int = SEED,
) -> tuple[Recording, list[dict[str, Any]]]:
  """Trains with the CIFAR-10 trainer (registry's Padam) and records every step's gradient.

  Returns the recording and the run's per-epoch records (as in ``metrics.jsonl``).
  """
  sink = _Sink()
  names: list[str] = []

  class RecordingTask(Cifar10Task):
    def transform(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
      return optax.chain(recorder(sink), super().transform(tx))

    def init_model(self, rngs):
      model = super().init_model(rngs)
      if not names:
        paths = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
        names.extend(
          jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
          for path, _ in paths
        )
      return model

  with tempfile.TemporaryDirectory(prefix="state-replay-") as workdir:
    config = Config(
      model=model,
      optimizer="padam",
      epochs=epochs,
      batch_size=batch_size,
      train_size=train_size,
      test_size=test_size,
      data_dir=data_dir,
      workdir=workdir,
      seed=seed,
      progress=False,
      eval_every=epochs,
      checkpoint_every=epochs,
    )
    train, test, _ = input_pipeline.load_splits(data_dir, train_size, test_size, seed)
    history = training.train(RecordingTask(config, train, test), config)
    jax.effects_barrier()
  gradients = sink.stacked()
  if len(names) != len(gradients):
    names[:] = [f"leaf{i}" for i in range(len(gradients))]
  return Recording(gradients, names), history


def save_recording(path: pathlib.Path, recording: Recording) -> None:
  arrays = {f"g{i:03d}": g for i, g in enumerate(recording.gradients)}
  np.savez(path, names=np.array(recording.names), **arrays)


def load_recording(path: pathlib.Path) -> Recording:
  with np.load(path) as f:
    keys = sorted(k for k in f.files if k.startswith("g"))
    return Recording([f[k] for k in keys], [str(n) for n in f["names"]])


# --- Replay --------------------------------------------------------------------------------------


def second_moment(state: Any) -> list[jax.Array]:
  """The leaves of the second moment a rule's update divides by, in float32: ``nu_max`` (Padam's
  ``vhat``) where the state has one, else ``nu``; decoded first from a quantized state."""
  if isinstance(state, padam_jax.QuantizedState):
    state = state.dequantize()

  def has_nu(x: Any) -> bool:
    return hasattr(x, "nu") and hasattr(x, "mu")

  found = [x for x in jax.tree.leaves(state, is_leaf=has_nu) if has_nu(x)]
  if len(found) != 1:
    raise ValueError(f"expected one state with a second moment, found {len(found)}")
  nu = getattr(found[0], "nu_max", found[0].nu)
  return [x.astype(jnp.float32) for x in jax.tree.leaves(nu)]


def _dot(a: Sequence[jax.Array], b: Sequence[jax.Array]) -> jax.Array:
  return sum(jnp.sum(x * y) for x, y in zip(a, b, strict=True))


def compare(
  u: Sequence[jax.Array],
  u32: Sequence[jax.Array],
  v: Sequence[jax.Array],
  v32: Sequence[jax.Array],
  p: float,
) -> jax.Array:
  """``[error, bias, d, p*d]`` of one step: the update ``u`` against float32's ``u32``, and the
  second moment ``v`` entering the step against float32's ``v32`` (all lists of leaves)."""
  norm = _dot(u32, u32)
  diff = [x - y for x, y in zip(u, u32, strict=True)]
  error = jnp.sqrt(_dot(diff, diff) / norm)
  bias = _dot(u, u32) / norm - 1.0
  rel = [
    jnp.where(y > 0, (x - y) / jnp.where(y > 0, y, 1.0), 0.0) for x, y in zip(v, v32, strict=True)
  ]
  d = jnp.sqrt(_dot(rel, rel) / sum(x.size for x in rel))
  weighted = [r * w for r, w in zip(rel, u32, strict=True)]
  predicted = p * jnp.sqrt(_dot(weighted, weighted) / norm)
  return jnp.stack([error, bias, d, predicted])


METRICS = ("error", "bias", "d", "p*d")


def replay(
  gradients: Sequence[jax.Array],
  reference: optax.GradientTransformation,
  variants: Mapping[str, optax.GradientTransformation],
  p: float,
) -> dict[str, np.ndarray]:
  """Replays ``gradients`` (a list of leaves, each ``(steps, *shape)``) through ``reference``
  (float32 state) and each of ``variants`` (the same rule with a narrow state), with fixed zero
  parameters. Returns, per variant, ``(steps, 4)``: :func:`compare`'s metrics at every step."""
  gradients = [jnp.asarray(g, jnp.float32) for g in gradients]
  params = [jnp.zeros(g.shape[1:], jnp.float32) for g in gradients]
  txs = [reference, *variants.values()]

  def step(states, g):
    moments = [second_moment(s) for s in states]
    outs = [tx.update(g, s, params) for tx, s in zip(txs, states, strict=True)]
    u32 = outs[0][0]
    rows = [
      compare(u, u32, v, moments[0], p) for (u, _), v in zip(outs[1:], moments[1:], strict=True)
    ]
    return [s for _, s in outs], jnp.stack(rows)

  run = jax.jit(lambda states, gs: jax.lax.scan(step, states, gs)[1])
  per_step = np.asarray(run([tx.init(params) for tx in txs], gradients))
  return {name: per_step[:, i] for i, name in enumerate(variants)}


# --- The optimizers ------------------------------------------------------------------------------

BF16 = jnp.bfloat16
STATES = (
  "bfloat16 m and v",
  "bfloat16 v only",
  "bfloat16 m only",
  "8-bit (`with_quantized_state`)",
)


@dataclasses.dataclass(frozen=True)
class Rule:
  """An optimizer whose state is replayed narrow: its ``p`` (the power of the second moment in
  the step), its factory ``make(mu_dtype, nu_dtype)`` and, when the 8-bit state wraps another
  transformation (``optax.adam``), that one's factory."""

  name: str
  p: float
  make: Callable[..., optax.GradientTransformation]
  make_8bit_inner: Callable[[], optax.GradientTransformation] | None = None


def _padam(name: str, p: float, settings: Mapping[str, float]) -> Rule:
  return Rule(name, p, lambda **kw: padam_jax.padam(**settings, p=p, **kw))


def _adam(name: str, settings: Mapping[str, float]) -> Rule:
  return Rule(
    name,
    0.5,
    lambda **kw: padam_jax.partial_adam(**settings, p=0.5, **kw),
    lambda: optax.adam(**settings),
  )


def rules(settings: Mapping[str, float] = SETTINGS) -> list[Rule]:
  """Padam at p = 1/8 and p = 1/2, and Adam, with ``settings`` (lr, b1, b2, eps)."""
  s = dict(settings)
  return [_padam(P_EIGHTH, 0.125, s), _padam(P_HALF, 0.5, s), _adam("Adam", s)]


def registry_rules() -> list[Rule]:
  """AMSGrad (Padam at p = 1/2) and Adam with the registry's own settings for CIFAR-10."""
  return [
    _padam("AMSGrad, b2 = 0.99", 0.5, REGISTRY_P_HALF),
    _adam("Adam, b2 = 0.99", REGISTRY_P_HALF),
  ]


def comparisons(
  rule: Rule, *, block_size: int = 16, min_size: int = 4096
) -> list[tuple[optax.GradientTransformation, dict[str, optax.GradientTransformation]]]:
  """Pairs (float32 reference, {state: the rule with that state}) for ``rule``: one for the
  bfloat16 states, and one for the 8-bit state when it wraps another transformation."""

  def quantized(tx):
    return padam_jax.with_quantized_state(tx, block_size=block_size, min_size=min_size)

  narrow = {
    STATES[0]: rule.make(mu_dtype=BF16, nu_dtype=BF16),
    STATES[1]: rule.make(nu_dtype=BF16),
    STATES[2]: rule.make(mu_dtype=BF16),
  }
  if rule.make_8bit_inner is None:
    return [(rule.make(), narrow | {STATES[3]: quantized(rule.make())})]
  inner = rule.make_8bit_inner
  return [(rule.make(), narrow), (inner(), {STATES[3]: quantized(inner())})]


def replay_all(
  gradients: Sequence[jax.Array], rule_list: Sequence[Rule], **quantization: int
) -> dict[tuple[str, str], np.ndarray]:
  """:func:`replay` of every rule's every state: ``(rule, state) -> (steps, 4)``."""
  out = {}
  for rule in rule_list:
    for reference, variants in comparisons(rule, **quantization):
      for state, metrics in replay(gradients, reference, variants, rule.p).items():
        out[rule.name, state] = metrics
  return out


# --- Report --------------------------------------------------------------------------------------


def summary(metrics: np.ndarray, last: int = LAST_STEPS) -> dict[str, float]:
  """Over the steps of one replay: the error's mean, median, 90th percentile and mean over the
  ``last`` steps, the bias's mean and last-steps mean, and the means of ``d`` and ``p*d``."""
  error, bias, d, predicted = metrics.T
  return {
    "error_mean": float(error.mean()),
    "error_median": float(np.median(error)),
    "error_p90": float(np.percentile(error, 90)),
    "error_last": float(error[-last:].mean()),
    "bias_mean": float(bias.mean()),
    "bias_last": float(bias[-last:].mean()),
    "d_mean": float(d.mean()),
    "pd_mean": float(predicted.mean()),
  }


def _pct(x: float, signed: bool = False) -> str:
  return f"{100 * x:+.2f}%" if signed else f"{100 * x:.2f}%"


def table(results: Mapping[tuple[str, str], np.ndarray]) -> str:
  """The Markdown table of :func:`summary` for every replay."""
  head = [
    "optimizer",
    "state",
    "error mean",
    "median",
    "90th pct",
    f"last {LAST_STEPS}",
    "bias mean",
    f"bias last {LAST_STEPS}",
    "d (vhat)",
    "p*d",
  ]
  lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
  for (rule, state), metrics in results.items():
    s = summary(metrics)
    cells = [rule, state] + [_pct(s[k]) for k in ("error_mean", "error_median", "error_p90")]
    cells += [_pct(s["error_last"]), _pct(s["bias_mean"], True), _pct(s["bias_last"], True)]
    cells += [_pct(s["d_mean"]), _pct(s["pd_mean"])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def ratio_table(results: Mapping[tuple[str, str], np.ndarray], low: str, high: str) -> str:
  """Per state, the ratio of rule ``low``'s error to rule ``high``'s (mean, median, last steps)
  and of their ``p*d``: 1/4 if the error were ``p`` times an error of ``vhat`` the same at both."""
  head = ["state", "error mean", "median", f"last {LAST_STEPS}", "p*d", "d"]
  lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
  for state in STATES:
    if (low, state) not in results or (high, state) not in results:
      continue
    a, b = summary(results[low, state]), summary(results[high, state])
    keys = ("error_mean", "error_median", "error_last", "pd_mean", "d_mean")
    cells = [state] + [f"{a[k] / b[k]:.2f}" if b[k] > 0 else "-" for k in keys]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def quantized_fraction(recording: Recording, block_size: int = 16, min_size: int = 4096) -> float:
  """The fraction of the parameters whose state :func:`padam_jax.with_quantized_state` quantizes
  (the rest, small leaves, stays float32)."""
  sizes = [(g[0], g[0].size) for g in recording.gradients]
  total = sum(n for _, n in sizes)
  return sum(n for x, n in sizes if _quantized.is_quantized(x, block_size, min_size)) / total


def describe(recording: Recording, history: Sequence[Mapping[str, Any]]) -> str:
  """The recorded run in a paragraph."""
  steps = recording.gradients[0].shape[0]
  params = sum(g[0].size for g in recording.gradients)
  accuracy = (
    f"; its test accuracy at the end: {history[-1]['test_acc']:.3f} on {TEST_SIZE} images"
    if history and "test_acc" in history[-1]
    else ""
  )
  return (
    f"The run: `{MODEL}` ({params:,} parameters in {len(recording.gradients)} leaves), "
    f"{TRAIN_SIZE} training images, batch {BATCH_SIZE}, {EPOCHS} epochs = {steps} steps, the "
    f"registry's Padam for cifar10, seed {SEED}{accuracy}. In 8 bits, "
    f"{100 * quantized_fraction(recording):.1f}% of the parameters have their state quantized "
    "(leaves of 4096+ elements whose last axis is a multiple of 16); the rest stays float32."
  )


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.state_replay", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--data-dir", help="folder holding cifar10.npz")
  parser.add_argument(
    "--gradients", type=pathlib.Path, help="a .npz of the recorded gradients: read if it exists"
  )
  parser.add_argument("--json", type=pathlib.Path, help="write the summaries and per-step errors")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  history: list[dict[str, Any]] = []
  if args.gradients is not None and args.gradients.exists():
    recording = load_recording(args.gradients)
  else:
    recording, history = record_gradients(args.data_dir)
    if args.gradients is not None:
      save_recording(args.gradients, recording)
  recorded = time.perf_counter() - start
  results = replay_all(recording.gradients, rules())
  registry = replay_all(recording.gradients, registry_rules())
  replayed = time.perf_counter() - start - recorded
  print(describe(recording, history))
  print()
  print(table(results))
  print()
  print("Padam p = 1/8 against p = 1/2, the ratio of their errors (1/4 if the error were p*d):")
  print()
  print(ratio_table(results, P_EIGHTH, P_HALF))
  print()
  print(
    "AMSGrad and Adam as the registry runs them on CIFAR-10 (b2 = 0.99 instead of Padam's 0.999; "
    "the same gradients):"
  )
  print()
  print(table(registry))
  print()
  print(
    f"`python -m benchmarks.state_replay` on {cpu_model()}, JAX {jax.__version__}: "
    f"recording {recorded:.0f} s, replay {replayed:.0f} s."
  )
  if args.json is not None:
    data = {
      f"{rule} | {state}": {
        **{k: round(v, 6) for k, v in summary(m).items()},
        "error_per_step": [float(f"{x:.3g}") for x in m[:, 0]],
      }
      for (rule, state), m in (results | registry).items()
    }
    lines = [f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in data.items()]
    args.json.write_text("{\n" + ",\n".join(lines) + "\n}\n")


if __name__ == "__main__":
  main()
