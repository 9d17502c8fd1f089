"""Checkpoints: save, digest, verify, and fall back to the newest one that verifies.

A checkpoint is an Orbax checkpoint named by the optimizer steps done when it was taken; it holds the
arrays of a run (the model and optimizer state, and inside an epoch the carried state) as a flat
list of leaves, and JSON metadata (the run's position, history and settings, see
:mod:`examples.training.records`) with the SHA-256 of those leaves. Every checkpoint is read back
and checked against its digest right after it is written; only then are older ones deleted, so the
newest checkpoint that verifies is never deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pathlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from examples.training import devices

CHECKPOINTS_DIR = "checkpoints"
# What every checkpoint's metadata holds (see records.checkpoint_meta).
META_KEYS = ("epoch", "history", "config", "rng")


class CheckpointError(ValueError):
  """A checkpoint cannot be used: its metadata is missing or garbled, or its arrays do not restore
  or do not match their digest."""


def _to_saveable(leaf: Any) -> Any:
  # Orbax stores plain arrays; typed PRNG keys (e.g. a model's dropout stream) go as their raw data.
  if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(leaf)
  return leaf


def _from_saved(saved: Any, like: Any) -> Any:
  if isinstance(like, jax.Array) and jnp.issubdtype(like.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(saved, impl=jax.random.key_impl(like))
  return saved


def host_leaves(state: Any) -> Iterator[np.ndarray]:
  """The leaves of ``state`` as whole host arrays, one at a time, in the form a checkpoint stores
  them (typed PRNG keys as their raw data).

  A leaf split over the devices of several processes is gathered (:func:`devices.host_value`):
  every process gets the same arrays, so every process computes the same digest from them.
  """
  for leaf in jax.tree.leaves(state):
    yield devices.host_value(_to_saveable(leaf))


def state_digest(leaves: Iterable[np.ndarray]) -> str:
  """SHA-256 over the dtype, shape and bytes of each array, in order."""
  digest = hashlib.sha256()
  for x in leaves:
    x = np.ascontiguousarray(x)
    digest.update(f"{x.dtype.str}{x.shape};".encode())
    digest.update(x.tobytes())
  return digest.hexdigest()


def fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
  """SHA-256 over the names, dtypes, shapes and bytes of ``arrays`` (a task's data)."""
  digest = hashlib.sha256()
  for name, x in arrays.items():
    digest.update(name.encode() + b"\0")
    digest.update(state_digest([np.asarray(x)]).encode())
  return digest.hexdigest()


def _first_line(error: BaseException) -> str:
  """The first line of ``error``'s message, or of its cause's when its own is empty or only an
  object's repr (``<bound method ...>``, as some of TensorStore's bindings give), at most 200
  characters."""
  for e in (error, error.__cause__, error.__context__):
    text = str(e).strip().splitlines() if e is not None else []
    if text and not text[0].startswith("<"):
      line = text[0]
      return line if len(line) <= 200 else line[:197] + "..."
  return "no readable message"


@contextlib.contextmanager
def _quiet_closed_event_loop(settle_seconds: float = 0.5) -> Iterator[None]:
  """Drops the "Event loop is closed" errors that TensorStore's pending reads report (as
  unraisable exceptions, tracebacks on stderr) after Orbax gave up on a corrupt checkpoint."""
  previous = sys.unraisablehook
  failed = []

  def hook(unraisable: Any) -> None:
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
      unraisable.exc_value
    ):
      return
    previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  except BaseException:
    failed.append(True)
    raise
  finally:
    if failed:
      time.sleep(settle_seconds)  # the pending reads finish and report while the hook is on
    sys.unraisablehook = previous


def position(meta: Mapping[str, Any]) -> str:
  """Where a checkpoint's run stood: ``epoch 3``, or ``epoch 3 and 120 steps of epoch 4``."""
  steps = int((meta.get("position") or {}).get("step", 0))
  if not steps:
    return f"epoch {meta['epoch']}"
  return f"epoch {meta['epoch']} and {steps} steps of epoch {int(meta['epoch']) + 1}"


class Checkpoints:
  """The Orbax checkpoints of a run in ``directory``, each named by its optimizer steps.

  Use it as a context manager, or call :meth:`close`.

  Attributes:
    directory: the folder of the checkpoints (``WORKDIR/checkpoints``).
    keep: how many verified checkpoints to keep.
    verified: the steps of the checkpoints known to verify, oldest first.
    positions: for each of ``verified``, where the run stood (:func:`position`).
  """

  def __init__(self, directory: pathlib.Path, keep: int = 2):
    self.directory = directory
    self.keep = keep
    self.verified: list[int] = []
    self.positions: dict[int, str] = {}
    # Deletion is ours (see save), not Orbax's max_to_keep, which does not know what verifies.
    # The temporary folders of a save that was killed are removed when the manager starts.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=None, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True
    )
    self.manager = ocp.CheckpointManager(
      directory.absolute(), options=options, item_names=("state", "meta")
    )

  def latest(self) -> str | None:
    """Where the newest checkpoint that verifies stands (:func:`position`), or None."""
    return self.positions[self.verified[-1]] if self.verified else None

  def meta_path(self, step: int) -> pathlib.Path:
    """The metadata file of the checkpoint of ``step``."""
    return self.directory / str(step) / "meta" / "metadata"

  def read_meta(self, step: int) -> dict[str, Any]:
    """The metadata of the checkpoint of ``step``; CheckpointError naming the file if unusable."""
    return read_meta_file(self.meta_path(step))

  def save(self, step: int, arrays: Any, meta: Mapping[str, Any]) -> bool:
    """Saves ``arrays`` and ``meta`` as the checkpoint of ``step``, reads it back and verifies it.

    Returns:
      Whether it verified. If so, checkpoints older than the ``keep`` newest verified ones are
      deleted; if not, it is reported in one line and deleted, and the older ones are kept.
    """
    meta = {**meta, "sha256": state_digest(host_leaves(arrays))}
    leaves = [_to_saveable(x) for x in jax.tree.leaves(arrays)]
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(leaves), meta=ocp.args.JsonSave(dict(meta))
      ),
      force=True,
    )
    self.manager.wait_until_finished()
    try:
      self.restore(step, arrays)
    except CheckpointError as e:
      devices.say(f"warning: {self._describe(step)} {e}; deleted it")
      self.manager.delete(step)
      return False
    self._verified(step, meta)
    if len(self.verified) == self.keep:
      for old in self.manager.all_steps():
        if old < self.verified[0]:
          self.manager.delete(old)
    return True

  def _verified(self, step: int, meta: Mapping[str, Any]) -> None:
    self.verified = [*(s for s in self.verified if s != step), step][-self.keep :]
    self.positions = {s: self.positions.get(s, "") for s in self.verified}
    self.positions[step] = position(meta)

  def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
    """The arrays (with the tree structure, shardings and key types of ``like``) and the metadata.

    Raises:
      CheckpointError: the metadata is missing or garbled, the arrays do not restore, or they do
        not match the digest in the metadata.
    """
    meta = self.read_meta(step)
    like_leaves, treedef = jax.tree.flatten(like)
    abstract = [
      jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding)
      for s in map(_to_saveable, like_leaves)
    ]
    try:
      with _quiet_closed_event_loop():
        restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )["state"]
    except Exception as e:  # Orbax and TensorStore raise many kinds; each means "unusable"
      raise CheckpointError(f"does not restore ({type(e).__name__}: {_first_line(e)})") from e
    if "sha256" in meta and state_digest(host_leaves(restored)) != meta["sha256"]:
      raise CheckpointError(f"has arrays that do not match the digest in {self.meta_path(step)}")
    leaves = [_from_saved(saved, ref) for saved, ref in zip(restored, like_leaves, strict=True)]
    return jax.tree.unflatten(treedef, leaves), meta

  def restore_newest(
    self, like: Callable[[Mapping[str, Any]], Any]
  ) -> tuple[Any, dict[str, Any]] | None:
    """The arrays and metadata of the newest checkpoint that verifies, or None if there is none.

    ``like(meta)`` gives the arrays' structure for a checkpoint's metadata. Each newer checkpoint
    that does not verify is reported in one line and deleted (its steps are run again). When none
    verifies, all are left as they are and CheckpointError is raised.
    """
    failed: list[tuple[int, str]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        arrays, meta = self.restore(step, like(self.read_meta(step)))
      except CheckpointError as e:
        failed.append((step, f"{self._describe(step)} {e}"))
        continue
      for bad, reason in failed:
        devices.say(f"warning: {reason}; deleted, continuing from {position(meta)}")
        self.manager.delete(bad)
      if "sha256" not in meta:
        devices.say(f"warning: {self._describe(step)} has no digest; used unverified")
      self._verified(step, meta)
      return arrays, meta
    if failed:
      raise CheckpointError(
        f"no checkpoint in {self.directory} can be used ({'; '.join(r for _, r in failed)}); "
        "pass --overwrite to start the run again or choose a new --workdir"
      )
    return None

  def _describe(self, step: int) -> str:
    try:
      where = position(self.read_meta(step))
    except CheckpointError:
      where = f"step {step}"
    return f"the checkpoint of {where} ({self.directory / str(step)})"

  def close(self) -> None:
    self.manager.close()

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def read_meta_file(path: pathlib.Path) -> dict[str, Any]:
  """A checkpoint's metadata; CheckpointError naming ``path`` when it is missing or garbled."""
  try:
    meta = json.loads(path.read_text())
  except FileNotFoundError as e:
    raise CheckpointError(f"has no metadata: {path} is missing") from e
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"has garbled metadata: {path} is not valid JSON ({e})") from e
  if not isinstance(meta, dict) or not all(k in meta for k in META_KEYS):
    raise CheckpointError(f"has garbled metadata: {path} lacks {', '.join(META_KEYS)}")
  return meta


def newest_meta(directory: pathlib.Path) -> dict[str, Any] | None:
  """The metadata of the newest checkpoint in ``directory`` whose metadata reads, or None if there
  is no checkpoint; CheckpointError (naming the newest one's file) if none reads."""
  if not directory.is_dir():
    return None
  steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)
  errors = []
  for step in steps:
    try:
      return read_meta_file(directory / str(step) / "meta" / "metadata")
    except CheckpointError as e:
      errors.append(f"the checkpoint of step {step} {e}")
  if errors:
    raise CheckpointError(f"no checkpoint in {directory} can be used: {'; '.join(errors)}")
  return None
