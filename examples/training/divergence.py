"""Divergence: a NaN or an infinity in the training loss, an evaluation or the state, or a loss
more than :data:`DIVERGED_FACTOR` times that of a uniform prediction, stops a run (exit status 3)
before anything of it is written, naming the last checkpoint whose metrics were finite and the way
on."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from examples import cli
from examples.training import devices
from examples.training.checkpoints import Checkpoints

# A training or evaluation loss above this many times the loss of a uniform prediction (the task's
# ``chance_loss``: log 10 for CIFAR-10, log of the vocabulary for PTB) has diverged, finite or not.
DIVERGED_FACTOR = 1000.0


class NonFiniteLossError(cli.RunStopped):
  """The training loss, an evaluation metric or the state became NaN or infinite; the run stopped,
  its last finite checkpoint kept."""

  exit_status = cli.EXIT_NON_FINITE


def _non_finite_message(what: str, checkpoints: Checkpoints, learning_rate: float | None) -> str:
  last = checkpoints.latest()
  lower = "a lower --lr" if learning_rate is None else f"a lower --lr (e.g. {learning_rate / 10:g})"
  if last is None:
    forward = (
      f"There is no checkpoint with finite metrics: start again with --overwrite and {lower}."
    )
  else:
    forward = (
      f"The last finite checkpoint, after {last}, is kept in {checkpoints.directory}: continue "
      f"from it with --resume and {lower}; the new base rate keeps the decay steps."
    )
  return f"{what}; stopping. {forward}"


def check_finite(
  live: Mapping[str, float],
  what: str,
  checkpoints: Checkpoints,
  learning_rate: float | None = None,
  chance_loss: float | None = None,
) -> None:
  """Raises :class:`NonFiniteLossError` when a metric of ``live`` is NaN or infinite, or a loss of
  it (``loss``, ``*_loss``) exceeds ``DIVERGED_FACTOR * chance_loss`` (when given).

  ``what`` says which metrics (``training loss in epoch 3 by step 40``); ``learning_rate`` (the
  run's base rate) makes the message suggest a lower one.
  """
  shown = ", ".join(f"{k}={v:.4g}" for k, v in live.items())
  if not all(math.isfinite(v) for v in live.values()):
    raise NonFiniteLossError(
      _non_finite_message(f"non-finite {what} ({shown})", checkpoints, learning_rate)
    )
  if chance_loss is None:
    return
  bound = DIVERGED_FACTOR * chance_loss
  if any(v > bound for k, v in live.items() if k == "loss" or k.endswith("_loss")):
    what = (
      f"diverged {what} ({shown}): above {DIVERGED_FACTOR:g}x the loss of a uniform prediction "
      f"({chance_loss:.4g})"
    )
    raise NonFiniteLossError(_non_finite_message(what, checkpoints, learning_rate))


@jax.jit
def _non_finite_flags(state: Any) -> Any:
  """Per array of ``state``: whether it holds a NaN or an infinity (one program for them all)."""
  return jax.tree.map(
    lambda x: (
      ~jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.zeros((), bool)
    ),
    state,
  )


def non_finite_arrays(state: Any) -> list[str]:
  """The paths of the floating-point arrays of ``state`` that hold a NaN or an infinity."""
  flat, _ = jax.tree_util.tree_flatten_with_path(_non_finite_flags(state))
  return [jax.tree_util.keystr(path) for path, bad in flat if bool(devices.host_value(bad))]


def check_finite_state(
  state: Any, where: str, checkpoints: Checkpoints, learning_rate: float | None = None
) -> None:
  """Raises :class:`NonFiniteLossError` when a parameter, optimizer-state or batch-statistics array
  holds a NaN or an infinity (the state is then not checkpointed); ``where``: ``after epoch 3``."""
  bad = non_finite_arrays(state)
  if bad:
    total = len(jax.tree.leaves(state))
    shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
    what = (
      f"non-finite values in {len(bad)} of the {total} arrays of the state {where} ({shown}); "
      "its checkpoint was not written"
    )
    raise NonFiniteLossError(_non_finite_message(what, checkpoints, learning_rate))
