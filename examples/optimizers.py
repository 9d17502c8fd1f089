"""The paper's optimizers, with the paper's hyperparameters, by name.

One registry for every trainer and benchmark in ``examples/``::

  from examples import optimizers

  setup = optimizers.make_optimizer(
      "padam", task="cifar10", steps_per_epoch=391, epochs=200,
      batch_size=128, train_size=50_000)
  setup.tx             # the optax.GradientTransformation
  setup.learning_rate  # the schedule, step -> learning rate
  setup.hyperparams    # every hyperparameter used (JSON-serialisable)

Hyperparameters are those of Section 5 of Chen et al. (IJCAI 2020):

- ``cifar10``: lr 0.1 for SGD-M and Padam, 1e-3 for the other adaptive methods;
  b1 0.9; b2 0.99 for Adam and AMSGrad, 0.999 otherwise; Padam p = 1/8;
  AdaBound final lr 0.1; Yogi eps 1e-3; AdamW normalized weight decay 0.025.
  Coupled L2 weight decay 5e-4 for every method but AdamW, as the authors'
  CIFAR script passes its ``--wd`` default (5e-4) to every optimizer it builds.
- ``ptb2`` / ``ptb3`` (2- and 3-layer LSTM): SGD-M lr 1 / 10; Adam, AMSGrad,
  AdamW, AdaBound lr 1e-3; Yogi lr 0.01 / 0.1; Padam lr 0.01 / 1 with p 0.4 / 0.2;
  AdaBound final lr 10 / 100; AdamW normalized weight decay 4e-4; b2 0.999.
  The paper gives no L2 weight decay for the language models: 0 here.

On these three tasks every learning rate follows the paper's step decay: x0.1
after 50% and 75% of the steps (epochs 100 and 150 of 200).

The fourth task, ``lm`` (transformer language models, not in the paper), takes
what transformer training uses instead: a linear warmup from 0 over the first
10% of the steps, then a cosine decay to 10% of the peak rate at the last step
(:func:`warmup_cosine_schedule`); b2 0.95 for every adaptive method (the value
GPT-style training uses, as the second moment then follows the loss spikes of
early training within ~20 steps; Padam gets the same so that only p differs);
and weight decay decoupled from the gradient on matrices only. SGD-M, AdamW and
PadamW (:data:`DECOUPLED`) decay each parameter the mask selects by
``(lr_t / lr_0) * weight_decay`` per step after the optimizer's update, with
``weight_decay`` 1e-4: optax.adamw's ``weight_decay=0.1`` at AdamW's base rate
1e-3, the same for every optimizer and every learning rate (a grid over rates
tunes the step, not the decay). The mask is the trainer's (its matrices, not its
embeddings, biases or norms), else every leaf of two or more dimensions. Adam,
Padam and the rest decay nothing there. Base rates: AdamW and Adam 1e-3, SGD-M
0.3, Padam 0.0721 at p = 1/8 (log-linear in 2p between SGD-M's 0.3 at p -> 0
and AdamW's 1e-3 at p = 1/2). Clipping at global norm 1 is the trainer's. AdamW's decay is Loshchilov & Hutter's:
``lambda = lambda_norm * sqrt(batch_size / (train_size * epochs))``, applied per
step as ``x <- x - (lr_t / lr_0) * lambda * x`` (it follows the schedule
multiplier, not the learning rate itself).

AMSGrad is PyTorch's ``Adam(amsgrad=True)`` (the maximum of the raw second
moment, as the authors ran it), which is ``padam_jax.padam`` at ``p = 1/2``;
``optax.amsgrad`` takes the maximum of the bias-corrected moment instead.

Every optimizer but Yogi, partial RMSprop, Adagrad and Adadelta also takes
``mu_dtype``: the dtype its first moment (SGD's momentum buffer) is stored in,
``"float32"``, ``"bfloat16"`` or ``"float16"``; None, the default, keeps the
parameters' dtype.

The registry is a table, :data:`REGISTRY`: name -> builder and default
hyperparameters (per task where they differ). The partially adaptive family and
AMSBound are not in the paper; their entries are untuned starting points derived
from Padam's values (see :func:`paper_hyperparams`). Gradient clipping (language models) is not part of
the registry: chain ``optax.clip_by_global_norm`` before ``setup.tx``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

import padam_jax

TASKS = ("cifar10", "ptb2", "ptb3", "lm")

DECAY_FACTOR = 0.1
DECAY_FRACTIONS = (0.5, 0.75)
# The ``lm`` task's schedule: linear warmup over this fraction of the steps, cosine decay to this
# fraction of the peak.
WARMUP_FRACTION = 0.1
COSINE_END = 0.1
# Tasks whose weight decay is decoupled and masked, and the optimizers that apply it there.
DECOUPLED_TASKS = frozenset({"lm"})
DECOUPLED = frozenset({"sgdm", "adamw", "padamw"})

# Hyperparameters that name a dtype: ``mu_dtype``, the dtype the first moment (or momentum buffer)
# is kept in, and ``nu_dtype``, the second moment's (and AMSGrad's running maximum's); None (the
# default) keeps it in the parameters' dtype. A dtype narrower than float32 is rounded
# stochastically (see padam_jax).
DTYPE_HYPERPARAMS = frozenset({"mu_dtype", "nu_dtype"})
# ``--state-bits``: 32 keeps the state as it is; 16 keeps every moment in bfloat16; 8 keeps the whole
# state in 8-bit block-wise codes (``padam_jax.with_quantized_state``).
STATE_BITS = (32, 16, 8)
# Optimizers whose state is a first moment only: 16 bits need no ``nu_dtype`` there.
FIRST_MOMENT_ONLY = frozenset({"sgdm"})
MOMENT_DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = "float32, bfloat16, float16, or null for the parameters' dtype"


@dataclasses.dataclass(frozen=True)
class OptimizerSetup:
  """What :func:`make_optimizer` returns.

  Attributes:
    tx: the optimizer.
    learning_rate: the learning-rate schedule it uses (step -> lr).
    hyperparams: every hyperparameter used, JSON-serialisable, for run logs.
  """

  tx: optax.GradientTransformation
  learning_rate: optax.Schedule
  hyperparams: dict[str, Any]


def paper_hyperparams(name: str, task: str) -> dict[str, Any]:
  """Returns the default hyperparameters of optimizer ``name`` on ``task`` (from :data:`REGISTRY`).

  Keys are the ones :func:`make_optimizer` accepts as overrides. For the
  partially adaptive family (not in the paper): Padam's ``p`` for the task;
  Padam's learning rate for the Adam-like rules and Adagrad; Padam's rate times
  ``1 - b1`` with momentum 0.9 for RMSprop (the same effective step as Padam's
  moving-average momentum); Adadelta's customary rate 1.

  Args:
    name: one of :data:`NAMES`.
    task: one of :data:`TASKS`.

  Returns:
    A new dict of the hyperparameters.
  """
  _check_choice("optimizer", name, NAMES)
  _check_choice("task", task, TASKS)
  return REGISTRY[name].for_task(task)


def step_decay_boundaries(total_steps: int) -> dict[int, float]:
  """The paper's decay steps: ``{int(0.5 T): 0.1, int(0.75 T): 0.1}`` for ``T`` steps.

  Coinciding milestones (``T < 4``) are merged into one factor of 0.01.
  """
  boundaries: dict[int, float] = {}
  for fraction in DECAY_FRACTIONS:
    step = int(fraction * total_steps)
    boundaries[step] = boundaries.get(step, 1.0) * DECAY_FACTOR
  return boundaries


def step_decay_schedule(learning_rate: float, total_steps: int) -> optax.Schedule:
  """``learning_rate`` x0.1 from step ``int(0.5 T)`` on and again from ``int(0.75 T)``.

  The values of ``optax.piecewise_constant_schedule(learning_rate,
  step_decay_boundaries(total_steps))``, computed in float32 without mixing the
  int32 step with Python floats (so it also runs under strict dtype promotion).
  """
  boundaries = sorted(step_decay_boundaries(total_steps).items())

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    count = jnp.asarray(count)
    value = jnp.asarray(learning_rate, jnp.float32)
    for step, factor in boundaries:
      value = jnp.where(count >= step, value * factor, value)
    return value

  return schedule


def warmup_cosine_schedule(learning_rate: float, total_steps: int) -> optax.Schedule:
  """The ``lm`` task's schedule: from 0 up to ``learning_rate`` linearly over the first
  ``WARMUP_FRACTION`` of ``total_steps`` (at least one step), then a cosine down to ``COSINE_END``
  times it at the last step (``optax.warmup_cosine_decay_schedule``)."""
  warmup = max(1, int(WARMUP_FRACTION * total_steps))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=learning_rate,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=COSINE_END * learning_rate,
  )


def matrices(params: Any) -> Any:
  """The default weight-decay mask of the ``lm`` task: True for leaves of two or more dimensions."""
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def normalized_weight_decay(
  weight_decay_normalized: float, batch_size: int, train_size: int, epochs: int
) -> float:
  """Loshchilov & Hutter's ``lambda_norm * sqrt(batch_size / (train_size * epochs))``."""
  for arg, value in (("batch_size", batch_size), ("train_size", train_size), ("epochs", epochs)):
    if not isinstance(value, int) or value <= 0:
      raise ValueError(
        f"{arg} must be a positive int for AdamW's normalized weight decay, got {value!r}"
      )
  return weight_decay_normalized * math.sqrt(batch_size / (train_size * epochs))


def make_optimizer(
  name: str,
  task: str = "cifar10",
  *,
  steps_per_epoch: int,
  epochs: int,
  batch_size: int | None = None,
  train_size: int | None = None,
  learning_rate: float | None = None,
  state_bits: int = 32,
  weight_decay_mask: Any = None,
  split_state: bool = False,
  **overrides: Any,
) -> OptimizerSetup:
  """Builds optimizer ``name`` with the paper's hyperparameters for ``task``.

  Args:
    name: one of :data:`NAMES`.
    task: one of :data:`TASKS`.
    steps_per_epoch: optimizer steps per epoch.
    epochs: number of epochs; with ``steps_per_epoch`` it places the decays.
    batch_size: examples per step (needed by AdamW's normalized weight decay).
    train_size: training examples per epoch (needed by AdamW).
    learning_rate: optional base learning rate replacing the paper's.
    state_bits: one of :data:`STATE_BITS`: 16 sets every moment's dtype to bfloat16, 8 wraps the
      optimizer in ``padam_jax.with_quantized_state``.
    weight_decay_mask: on a task with decoupled decay (``lm``), which parameters decay: a pytree
      of bools or a function of the parameters returning one (default: :func:`matrices`).
    split_state: the state will be split over devices (FSDP); with ``state_bits=8`` each
      parameter's state is then updated whole (``chunk_size=None``) rather than in slices of
      rows, which would cross devices where a first axis is split.
    **overrides: any other hyperparameter of :func:`paper_hyperparams`.

  Returns:
    An :class:`OptimizerSetup`.

  Raises:
    ValueError: for an unknown name, task or override key (the message lists the
      valid ones), or non-positive step counts.
  """
  hyperparams = _hyperparams(name, task, overrides, state_bits, learning_rate)
  for arg, value in (("steps_per_epoch", steps_per_epoch), ("epochs", epochs)):
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"{arg} must be a positive int, got {value!r}")
  total_steps = steps_per_epoch * epochs
  lr0 = float(hyperparams["learning_rate"])
  lm = task in DECOUPLED_TASKS
  if lm:
    schedule = warmup_cosine_schedule(lr0, total_steps)
  else:
    schedule = step_decay_schedule(lr0, total_steps)
  _normalize_decay(name, hyperparams, batch_size, train_size, epochs)
  entry = REGISTRY[name]
  if entry.anneal:
    hyperparams["anneal_steps"] = max(1, int(hyperparams["anneal_fraction"] * total_steps))
    schedule = _rising(schedule, hyperparams)

  decoupled = lm and name in DECOUPLED and hyperparams["weight_decay"] != 0
  # A decoupled decay is added after the optimizer's own update (its builder decays nothing).
  tx = entry.build(schedule, {**hyperparams, "weight_decay": 0.0} if lm else dict(hyperparams))
  if decoupled:
    tx = _with_decoupled_decay(tx, hyperparams["weight_decay"], schedule, lr0, weight_decay_mask)
  if state_bits == 8:
    tx = padam_jax.with_quantized_state(tx, **({"chunk_size": None} if split_state else {}))
  log = {
    "optimizer": name,
    "task": task,
    **{k: _jsonable(v) for k, v in hyperparams.items()},
    **({"state_bits": state_bits} if state_bits != 32 else {}),
    **_schedule_log(lm, total_steps),
    **({"weight_decay_style": "decoupled, masked"} if decoupled else {}),
    "total_steps": total_steps,
    "batch_size": batch_size,
    "train_size": train_size,
  }
  return OptimizerSetup(tx=tx, learning_rate=schedule, hyperparams=log)


def _hyperparams(
  name: str,
  task: str,
  overrides: Mapping[str, Any],
  state_bits: int,
  learning_rate: float | None,
) -> dict[str, Any]:
  """The registry's hyperparameters with ``overrides``, ``state_bits`` and ``learning_rate``
  applied; ValueError for an unknown key or a bad dtype."""
  hyperparams = paper_hyperparams(name, task)
  unknown = sorted(set(overrides) - set(hyperparams))
  if unknown:
    valid = ", ".join(["learning_rate", *sorted(k for k in hyperparams if k != "learning_rate")])
    raise ValueError(f"unknown hyperparameter(s) {', '.join(unknown)} for {name!r}; valid: {valid}")
  hyperparams.update(overrides)
  _apply_state_bits(name, hyperparams, state_bits)
  _check_dtypes(name, hyperparams)
  if learning_rate is not None:
    hyperparams["learning_rate"] = learning_rate
  return hyperparams


def _normalize_decay(
  name: str,
  hyperparams: dict[str, Any],
  batch_size: int | None,
  train_size: int | None,
  epochs: int,
) -> None:
  """AdamW's and PadamW's normalized weight decay, when they use it, as the decay they apply."""
  if name == "adamw" and hyperparams["weight_decay"] is None:
    _check_sizes(name, batch_size, train_size)
    hyperparams["weight_decay"] = normalized_weight_decay(
      hyperparams["weight_decay_normalized"], batch_size, train_size, epochs
    )
  if name == "padamw" and hyperparams["weight_decay_normalized"] is not None:
    # padamw multiplies its decay by lr_t: lambda / lr_0 makes the step's decay (lr_t / lr_0) lambda.
    _check_sizes(name, batch_size, train_size)
    decay = normalized_weight_decay(
      hyperparams["weight_decay_normalized"], batch_size, train_size, epochs
    )
    hyperparams["weight_decay"] = decay / float(hyperparams["learning_rate"])


def _with_decoupled_decay(
  tx: optax.GradientTransformation,
  decay: float,
  schedule: optax.Schedule,
  lr0: float,
  mask: Any,
) -> optax.GradientTransformation:
  """``tx``, then ``x <- x - (lr_t / lr_0) * decay * x`` on the leaves ``mask`` selects (default:
  :func:`matrices`)."""
  return optax.chain(
    tx,
    optax.add_decayed_weights(
      lambda count: -decay * schedule(count) / lr0, matrices if mask is None else mask
    ),
  )


def _schedule_log(lm: bool, total_steps: int) -> dict[str, Any]:
  if lm:
    return {
      "schedule": "warmup_cosine",
      "warmup_steps": max(1, int(WARMUP_FRACTION * total_steps)),
      "cosine_end": COSINE_END,
    }
  boundaries = sorted(step_decay_boundaries(total_steps).items())
  return {"schedule": "step_decay", "decay_boundaries": [[b, s] for b, s in boundaries]}


def dtype_name(value: Any) -> str | None:
  """The name of dtype ``value`` (``"bfloat16"``, ``jnp.bfloat16``, ...) if it is one of
  :data:`MOMENT_DTYPES`, else None."""
  if value is None:
    return None  # numpy reads None as float64
  try:
    name = jnp.dtype(value).name
  except (TypeError, ValueError, KeyError):
    return None
  return name if name in MOMENT_DTYPES else None


def _check_dtypes(name: str, hyperparams: dict[str, Any]) -> None:
  """Replaces each dtype hyperparameter that is not None by its name; ValueError if not valid."""
  for key in sorted(DTYPE_HYPERPARAMS & hyperparams.keys()):
    value = hyperparams[key]
    if value is None:
      continue
    if dtype_name(value) is None:
      raise ValueError(f"{key} {value!r} is not valid for {name!r}; expected {DTYPE_CHOICES}")
    hyperparams[key] = dtype_name(value)


def _apply_state_bits(name: str, hyperparams: dict[str, Any], state_bits: int) -> None:
  """Sets the moments' dtypes for ``state_bits`` 16; ValueError for an unknown width, or 16 on an
  optimizer whose second moment has no dtype to set (or a dtype set otherwise by hand)."""
  if state_bits not in STATE_BITS:
    valid = ", ".join(map(str, STATE_BITS))
    raise ValueError(f"--state-bits {state_bits!r} is not valid; expected one of {valid}")
  if state_bits != 16:
    return
  if "nu_dtype" not in hyperparams and name not in FIRST_MOMENT_ONLY:
    raise ValueError(
      f"--state-bits 16 is not valid for {name}: its second moment has no dtype to set (use 8, "
      "or an optimizer of padam_jax)"
    )
  for key in sorted(DTYPE_HYPERPARAMS & hyperparams.keys()):
    if hyperparams[key] not in (None, "bfloat16"):
      raise ValueError(
        f"--state-bits 16 sets {key} to bfloat16; it is {hyperparams[key]!r} (drop one of them)"
      )
    hyperparams[key] = "bfloat16"


def _check_sizes(name: str, batch_size: int | None, train_size: int | None) -> None:
  if batch_size is None or train_size is None:
    raise ValueError(
      f"{name} needs batch_size and train_size for its normalized weight "
      "decay (or pass weight_decay=... directly)"
    )


def _rising(schedule: optax.Schedule, hp: Mapping[str, Any]) -> optax.Schedule:
  """``schedule`` times a factor rising log-linearly from ``init_lr_ratio`` to 1 over the anneal."""
  rise = optax.exponential_decay(
    hp["init_lr_ratio"],
    hp["anneal_steps"],
    decay_rate=1.0 / hp["init_lr_ratio"],
    end_value=1.0,
  )
  return lambda count: schedule(count) * rise(count)


def _padam_annealed(lr: optax.Schedule, hp: dict[str, Any]) -> optax.GradientTransformation:
  p = padam_jax.anneal_p(hp["anneal_steps"], hp["init_p"], hp["end_p"], shape="linear")
  return _padam(lr, {**hp, "p": p})


def _check_choice(kind: str, value: str, valid: tuple[str, ...]) -> None:
  if value not in valid:
    raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")


def _jsonable(value: Any) -> Any:
  if value is None or isinstance(value, bool | int | float | str):
    return value
  return repr(value)  # a schedule passed as an override, e.g. p


def _l2(hp: Mapping[str, Any], tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """Coupled L2: ``weight_decay * x`` added to the gradient before ``tx``."""
  return optax.chain(optax.add_decayed_weights(hp["weight_decay"]), tx)


def _sgdm(lr: optax.Schedule, hp: dict[str, Any]) -> optax.GradientTransformation:
  # optax.sgd's trace is PyTorch's SGD momentum buffer: b = mu b + g, x -= lr b.
  sgd = optax.sgd(
    lr, momentum=hp["momentum"], nesterov=hp["nesterov"], accumulator_dtype=hp["mu_dtype"]
  )
  return _l2(hp, sgd)


def _adam(lr: optax.Schedule, hp: dict[str, Any]) -> optax.GradientTransformation:
  return _l2(hp, optax.adam(lr, b1=hp["b1"], b2=hp["b2"], eps=hp["eps"], mu_dtype=hp["mu_dtype"]))


def _amsgrad(lr: optax.Schedule, hp: dict[str, Any]) -> optax.GradientTransformation:
  return padam_jax.padam(
    lr,
    p=0.5,
    b1=hp["b1"],
    b2=hp["b2"],
    eps=hp["eps"],
    weight_decay=hp["weight_decay"],
    mu_dtype=hp["mu_dtype"],
    nu_dtype=hp["nu_dtype"],
  )


def _adamw(lr: optax.Schedule, hp: dict[str, Any]) -> optax.GradientTransformation:
  # optax.adamw decays by lr_t * wd; dividing by lr_0 makes it (lr_t / lr_0) * lambda.
  return optax.adamw(
    lr,
    b1=hp["b1"],
    b2=hp["b2"],
    eps=hp["eps"],
    weight_decay=hp["weight_decay"] / hp["learning_rate"],
    mu_dtype=hp["mu_dtype"],
  )


def _yogi(lr: optax.Schedule, hp: dict[str, Any]) -> optax.GradientTransformation:
  return _l2(hp, optax.yogi(lr, b1=hp["b1"], b2=hp["b2"], eps=hp["eps"]))


def _bound(attr: str) -> Callable[[optax.Schedule, dict[str, Any]], optax.GradientTransformation]:
  def build(lr: optax.Schedule, hp: dict[str, Any]) -> optax.GradientTransformation:
    return getattr(padam_jax, attr)(
      lr,
      final_lr=hp["final_lr"],
      b1=hp["b1"],
      b2=hp["b2"],
      eps=hp["eps"],
      gamma=hp["gamma"],
      weight_decay=hp["weight_decay"],
      mu_dtype=hp["mu_dtype"],
      nu_dtype=hp["nu_dtype"],
    )

  return build


def _padam(lr: optax.Schedule, hp: dict[str, Any]) -> optax.GradientTransformation:
  return padam_jax.padam(
    lr,
    p=hp["p"],
    b1=hp["b1"],
    b2=hp["b2"],
    eps=hp["eps"],
    weight_decay=hp["weight_decay"],
    bias_correction=hp["bias_correction"],
    mu_dtype=hp["mu_dtype"],
    nu_dtype=hp["nu_dtype"],
  )


def _family(attr: str) -> Callable[[optax.Schedule, dict[str, Any]], optax.GradientTransformation]:
  def build(lr: optax.Schedule, hp: dict[str, Any]) -> optax.GradientTransformation:
    skip = ("learning_rate", "weight_decay_normalized")
    kwargs = {k: v for k, v in hp.items() if k not in skip}
    return getattr(padam_jax, attr)(lr, **kwargs)

  return build


Builder = Callable[[optax.Schedule, dict[str, Any]], optax.GradientTransformation]


class PerTask(dict):
  """A hyperparameter whose value depends on the task: ``PerTask(cifar10=..., ptb2=..., ptb3=...,
  lm=...)``."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One optimizer of the registry.

  Attributes:
    build: ``(schedule, hyperparams) -> optax.GradientTransformation``.
    hyperparams: the defaults, in the order they are logged; a :class:`PerTask` value differs by task.
    group: ``"paper"`` (the seven the paper compares, Section 5), ``"family"`` (the partially
      adaptive family) or ``"extra"``.
    anneal: whether ``p`` is annealed: the builder gets ``anneal_steps`` (``anneal_fraction`` of the
      steps) and the learning rate rises log-linearly from ``init_lr_ratio`` times the base rate
      to the base rate over those steps, then follows the step decay.
  """

  build: Builder
  hyperparams: Mapping[str, Any]
  group: str = "paper"
  anneal: bool = False

  def for_task(self, task: str) -> dict[str, Any]:
    """The hyperparameters for ``task``, as a new dict."""
    return {k: v[task] if isinstance(v, PerTask) else v for k, v in self.hyperparams.items()}


def _tasks(cifar10: Any, ptb2: Any, ptb3: Any, lm: Any) -> PerTask:
  return PerTask(cifar10=cifar10, ptb2=ptb2, ptb3=ptb3, lm=lm)


# Values that differ between tasks, from the paper's Section 5 (and, for lm, from transformer
# training: see the module's docstring).
_LM_SGDM_LR = 0.3
_LM_ADAM_LR = 1e-3
# Padam's lm rate at p = 1/8: log-linear in 2p between SGD-M (p -> 0) and AdamW (p = 1/2).
_LM_PADAM_LR = float(f"{_LM_SGDM_LR * (_LM_ADAM_LR / _LM_SGDM_LR) ** 0.25:.3g}")
_PADAM_LR = _tasks(0.1, 0.01, 1.0, _LM_PADAM_LR)
_PADAM_P = _tasks(0.125, 0.4, 0.2, 0.125)
_L2 = _tasks(5e-4, 0.0, 0.0, 0.0)
# SGD-M's and PadamW's weight decay: coupled L2 on the paper's tasks, decoupled on lm (see above).
_DECAY = _tasks(5e-4, 0.0, 0.0, 1e-4)
_B2 = _tasks(0.999, 0.999, 0.999, 0.95)
_ADAM = {"b1": 0.9, "b2": _B2, "eps": 1e-8}
_BOUND = {
  "learning_rate": 1e-3,
  "final_lr": _tasks(0.1, 10.0, 100.0, _LM_SGDM_LR),
  **_ADAM,
  "gamma": 1e-3,
  "weight_decay": _L2,
  "mu_dtype": None,
  "nu_dtype": None,
}
_PARTIAL_ADAM = {
  "learning_rate": _PADAM_LR,
  "p": _PADAM_P,
  **_ADAM,
  "weight_decay": _L2,
  "mu_dtype": None,
  "nu_dtype": None,
}

# The registry: name -> builder and default hyperparameters. Its order is NAMES's: the paper's seven,
# then the partially adaptive family and AMSBound (not in the paper: untuned starting points).
REGISTRY: dict[str, Entry] = {
  "sgdm": Entry(
    _sgdm,
    {
      "learning_rate": _tasks(0.1, 1.0, 10.0, _LM_SGDM_LR),
      "momentum": 0.9,
      "nesterov": False,
      "weight_decay": _DECAY,
      "mu_dtype": None,
    },
  ),
  "adam": Entry(
    _adam,
    {
      "learning_rate": 1e-3,
      "b1": 0.9,
      "b2": _tasks(0.99, 0.999, 0.999, 0.95),
      "eps": 1e-8,
      "weight_decay": _L2,
      "mu_dtype": None,
    },
  ),
  "amsgrad": Entry(
    _amsgrad,
    {
      "learning_rate": 1e-3,
      "b1": 0.9,
      "b2": _tasks(0.99, 0.999, 0.999, 0.95),
      "eps": 1e-8,
      "weight_decay": _L2,
      "mu_dtype": None,
      "nu_dtype": None,
    },
  ),
  "adamw": Entry(
    _adamw,
    {
      "learning_rate": 1e-3,
      **_ADAM,
      "weight_decay_normalized": _tasks(0.025, 4e-4, 4e-4, None),
      "weight_decay": _tasks(None, None, None, 1e-4),
      "mu_dtype": None,
    },
  ),
  "yogi": Entry(
    _yogi,
    {
      "learning_rate": _tasks(1e-3, 0.01, 0.1, 1e-2),
      "b1": 0.9,
      "b2": _B2,
      "eps": 1e-3,
      "weight_decay": _L2,
    },
  ),
  "adabound": Entry(_bound("adabound"), _BOUND),
  "padam": Entry(_padam, {**_PARTIAL_ADAM, "bias_correction": True}),
  "partial_adam": Entry(_family("partial_adam"), _PARTIAL_ADAM, group="family"),
  "partial_rmsprop": Entry(
    _family("partial_rmsprop"),
    {
      "learning_rate": PerTask({t: lr * (1 - 0.9) for t, lr in _PADAM_LR.items()}),
      "p": _PADAM_P,
      "decay": _B2,
      "eps": 1e-8,
      "momentum": 0.9,
      "weight_decay": _L2,
      "nu_dtype": None,
    },
    group="family",
  ),
  "partial_adagrad": Entry(
    _family("partial_adagrad"),
    {
      "learning_rate": _PADAM_LR,
      "p": _PADAM_P,
      "initial_accumulator_value": 0.0,
      "eps": 1e-10,
      "weight_decay": _L2,
      "nu_dtype": None,
    },
    group="family",
  ),
  "partial_adamax": Entry(_family("partial_adamax"), _PARTIAL_ADAM, group="family"),
  "partial_adadelta": Entry(
    _family("partial_adadelta"),
    {
      "learning_rate": 1.0,
      "p": _PADAM_P,
      "rho": 0.9,
      "eps": 1e-6,
      "weight_decay": _L2,
      "nu_dtype": None,
    },
    group="family",
  ),
  "padamw": Entry(
    _family("padamw"),
    {**_PARTIAL_ADAM, "weight_decay": _DECAY, "weight_decay_normalized": None},
    group="family",
  ),
  "amsbound": Entry(_bound("amsbound"), _BOUND, group="extra"),
  "padam_annealed": Entry(
    _padam_annealed,
    {
      "learning_rate": _PADAM_LR,
      "init_p": 0.5,
      "end_p": _PADAM_P,
      "anneal_fraction": 0.25,
      "init_lr_ratio": 0.01,
      **_ADAM,
      "weight_decay": _L2,
      "bias_correction": True,
      "mu_dtype": None,
      "nu_dtype": None,
    },
    group="extra",
    anneal=True,
  ),
}

NAMES = tuple(REGISTRY)
PAPER_OPTIMIZERS = tuple(name for name, entry in REGISTRY.items() if entry.group == "paper")
FAMILY = tuple(name for name, entry in REGISTRY.items() if entry.group == "family")
