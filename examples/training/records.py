"""What a run keeps in its workdir, and the rules for a workdir that holds one already.

``WORKDIR/metrics.jsonl`` (finished epochs, :mod:`examples.metrics`), ``WORKDIR/run.json`` (the
settings, data, devices and memory), ``WORKDIR/stopped.json`` (why a run stopped early),
``WORKDIR/checkpoints/`` (:mod:`examples.training.checkpoints`) and one lock file per process, held
while the run lives so that a second launch into the same folder is refused. A run in a folder
that holds another is refused, replaced (``--overwrite``) or continued (``--resume``: same settings
but ``--lr``, same data) from its newest checkpoint, at the epoch and step it was taken.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples import metrics, optimizers
from examples.training import devices, settings
from examples.training.checkpoints import CHECKPOINTS_DIR, Checkpoints, newest_meta, position
from examples.training.settings import LoopConfig
from examples.training.task import Carry, Task

# What a previous run leaves in its workdir; a new run refuses to start over them.
PREVIOUS_RUN_FILES = (metrics.METRICS_FILE, metrics.RUN_FILE, CHECKPOINTS_DIR, metrics.STOPPED_FILE)
# Each process of a run holds ``WORKDIR/.lock-I`` (I: its process index) while the run lives.
LOCK_PREFIX = ".lock-"


@dataclasses.dataclass
class RunState:
  """Where a run stands: after its last finished epoch, and how far into the next one.

  Attributes:
    state: the model and optimizer state.
    root: the run's root PRNG key (every epoch's key is derived from it).
    history: one record per finished epoch.
    epoch: the last finished epoch (0 before the first).
    resumptions: one record per resumption: the epoch it continued after (and the steps into the
      next one, if any) and the settings it changed (``{"learning_rate": [old, new]}``).
    step: steps of epoch ``epoch + 1`` already done (a run resumed inside an epoch), else 0.
    carry: the carried state after those steps (None when ``step`` is 0).
    sums: the epoch's metric sums after those steps, as Python floats.
    seconds: the seconds those steps took.
  """

  state: Any
  root: jax.Array
  history: list[dict[str, Any]]
  epoch: int = 0
  resumptions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  step: int = 0
  carry: Carry = None
  sums: dict[str, float] = dataclasses.field(default_factory=dict)
  seconds: float = 0.0


# ---- the workdir and what it holds ----


def lock_path(workdir: pathlib.Path) -> pathlib.Path:
  """This process's lock file in ``workdir``."""
  return workdir / f"{LOCK_PREFIX}{jax.process_index()}"


def _lock(path: pathlib.Path) -> int | None:
  """The descriptor of ``path`` locked by this process, or None if another process holds it."""
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    return None
  return fd


def _holder(path: pathlib.Path) -> str:
  try:
    text = path.read_text().strip()
  except OSError:
    text = ""
  return f" ({text})" if text else ""


def _in_use(workdir: pathlib.Path, path: pathlib.Path) -> ValueError:
  return ValueError(
    f"{workdir} is in use by another run{_holder(path)}; wait for it to end or choose another "
    "--workdir"
  )


def check_not_in_use(workdir: pathlib.Path) -> None:
  """Raises ValueError when a live run holds ``workdir`` (its lock; a crashed run holds none)."""
  path = lock_path(workdir)
  fd = _lock(path)
  if fd is None:
    raise _in_use(workdir, path)
  os.close(fd)


@contextlib.contextmanager
def hold_workdir(workdir: pathlib.Path) -> Iterator[None]:
  """Holds ``workdir`` for this run: every process locks its own lock file (the processes of one
  run share the folder, a second launch's process of the same index finds its file locked).

  A process that dies releases its lock with it. Every process must enter it (it agrees through a
  collective); ValueError on every process when any of them finds the folder in use.
  """
  path = lock_path(workdir)
  fd = _lock(path)
  if not all(devices.all_processes(fd is not None)):
    if fd is not None:
      os.close(fd)
    raise _in_use(workdir, path)
  try:
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
    yield
  finally:
    os.close(fd)


def previous_run_files(workdir: pathlib.Path) -> list[str]:
  """The names in ``workdir`` a previous run left there: metrics.jsonl, run.json, checkpoints/ (if
  it holds anything)."""
  found = []
  for name in PREVIOUS_RUN_FILES:
    path = workdir / name
    if path.is_dir() and any(path.iterdir()):
      found.append(f"{name}/")
    elif path.is_file():
      found.append(name)
  return found


def _recorded_epochs(workdir: pathlib.Path) -> int:
  path = metrics.metrics_path(workdir)
  if not path.is_file():
    return 0
  return sum(1 for line in path.read_text(errors="replace").splitlines() if line.strip())


def check_same_run(
  saved: Mapping[str, Any], current: Mapping[str, Any], directory: pathlib.Path
) -> None:
  """Raises ValueError naming each setting that differs between a checkpoint and this run (but
  those that may change on resume)."""
  saved = {**settings.ADDED_FIELDS, **saved}
  may_change = settings.RESUMABLE_FIELDS | settings.CHANGEABLE_ON_RESUME
  differ = sorted(
    k for k in set(saved) | set(current) if k not in may_change and saved.get(k) != current.get(k)
  )
  if differ:
    detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in differ)
    raise ValueError(
      f"cannot resume from {directory}: the run's settings differ ({detail}). Use the same "
      "settings (only --lr may change) or a new --workdir."
    )


def check_previous_run(config: LoopConfig) -> LoopConfig:
  """Applies the rule for a workdir that holds a previous run; returns the config to run.

  - No previous run's files: a new run (with or without ``--resume``).
  - ``--overwrite``: a new run; :func:`remove_previous_run` removes the previous files first.
  - ``--resume`` with a checkpoint: the settings must be the checkpoint's but ``--lr``, which
    defaults to the run's (returned in the config).
  - ``--resume`` without a checkpoint: a new run if ``metrics.jsonl`` records no finished epoch
    (nothing is lost), else refused.
  - Otherwise refused: ValueError, one line.
  """
  workdir = pathlib.Path(config.workdir)
  found = previous_run_files(workdir)
  if not found or config.overwrite:
    return config
  if not config.resume:
    raise ValueError(
      f"{workdir} holds a previous run ({', '.join(found)}); pass --resume to continue it, "
      "--overwrite to replace it, or choose a new --workdir"
    )
  meta = newest_meta(workdir / CHECKPOINTS_DIR)
  if meta is None:
    epochs = _recorded_epochs(workdir)
    if epochs:
      raise ValueError(
        f"cannot resume {workdir}: its metrics.jsonl records {epochs} finished epoch(s) but "
        "there is no checkpoint to continue from; pass --overwrite to start again or choose a "
        "new --workdir"
      )
    return config
  check_same_run(meta["config"], settings.jsonable(config), workdir)
  saved_lr = meta["config"].get("learning_rate")
  if config.learning_rate is None and saved_lr is not None:
    config = dataclasses.replace(config, learning_rate=saved_lr)
  return config


def check_run(config: LoopConfig, registry_task: str) -> LoopConfig:
  """Every check that needs neither data nor a model, so that a bad option costs no time.

  The devices and batch, the optimizer's hyperparameters, the workdir (:mod:`settings`), whether
  a live run holds it (:func:`check_not_in_use`) and what it holds (:func:`check_previous_run`);
  the config's own values were checked when it was made. A trainer calls it before it loads its
  data; :func:`examples.training.train` calls it again.

  Returns:
    The config to run (on ``--resume`` without ``--lr``, with the run's learning rate).
  """
  settings.check_devices(config)
  settings.check_optimizer(config, registry_task)
  settings.check_workdir(config, CHECKPOINTS_DIR)
  check_not_in_use(pathlib.Path(config.workdir))
  return check_previous_run(config)


def check_same_data(config: LoopConfig, task: Task) -> None:
  """On ``--resume``, raises ValueError when the task's data differ from the checkpoint's."""
  if not config.resume:
    return
  meta = newest_meta(pathlib.Path(config.workdir) / CHECKPOINTS_DIR)
  saved = (meta or {}).get("data") or {}
  current = task.describe_data() or {}
  if saved.get("sha256") and current.get("sha256") and saved["sha256"] != current["sha256"]:
    raise ValueError(
      f"cannot resume {config.workdir}: its data differ from the checkpoint's (SHA-256 "
      f"{saved['sha256'][:16]}... of {saved.get('files')}, now {current['sha256'][:16]}... of "
      f"{current.get('files')}). Use the same data or a new --workdir."
    )


def check_same_on_every_process(config: LoopConfig, task: Task) -> None:
  """Raises ValueError, on every process, unless all processes of a multi-process run have the
  same settings and data (SHA-256 of both, compared through a collective); nothing in a single
  process. The folders (``workdir``, ``data_dir``) may be named differently on different hosts.
  Every process must call it: it also waits for them all."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  values = settings.jsonable(config)
  same = {k: v for k, v in values.items() if k not in ("workdir", "data_dir")}
  text = json.dumps({"config": same, "data": task.describe_data()}, sort_keys=True)
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
  digests = np.asarray(multihost_utils.process_allgather(digest))
  differ = [i for i, row in enumerate(digests) if not np.array_equal(row, digests[0])]
  if differ:
    raise ValueError(
      f"the processes of this run differ in their settings or data (process 0 and process(es) "
      f"{', '.join(map(str, differ))}): every process must run the same command (but "
      "--process-id) on the same data"
    )


def remove_previous_run(config: LoopConfig) -> None:
  """With ``--overwrite``, deletes the previous run's metrics.jsonl, run.json and checkpoints/.

  In a multi-process run the primary process deletes them, and every process waits for it.
  """
  workdir = pathlib.Path(config.workdir)
  found = previous_run_files(workdir)
  if not config.overwrite or not found:
    return
  if not devices.is_primary():
    devices.sync_processes("previous run removed")
    return
  for name in PREVIOUS_RUN_FILES:
    path = workdir / name
    if path.is_dir():
      shutil.rmtree(path)
    elif path.exists():
      path.unlink()
  devices.say(f"Replaced the previous run in {workdir} ({', '.join(found)}).")
  devices.sync_processes("previous run removed")


# ---- starting, resuming and recording ----


def _resumption(meta: Mapping[str, Any], config: LoopConfig) -> dict[str, Any]:
  """The record of a resumption: where it continues and the settings it changed."""
  current = settings.jsonable(config)
  changed = {
    k: [meta["config"].get(k), current.get(k)]
    for k in sorted(settings.CHANGEABLE_ON_RESUME)
    if meta["config"].get(k) != current.get(k)
  }
  record: dict[str, Any] = {"after_epoch": int(meta["epoch"])}
  steps = int((meta.get("position") or {}).get("step", 0))
  if steps:
    record["steps_into_epoch"] = steps
  return {**record, "changed": changed}


def write_history(workdir: pathlib.Path, history: list[dict[str, Any]]) -> None:
  """Rewrites metrics.jsonl to ``history`` (the primary process)."""
  if devices.is_primary():
    metrics.write_metrics(workdir, history)


def restore_or_start(
  checkpoints: Checkpoints,
  state: Any,
  root: jax.Array,
  task: Task,
  config: LoopConfig,
  carry_like: Callable[[], Carry],
) -> RunState:
  """The run from its newest checkpoint that verifies (with ``config.resume``), or a fresh one.

  Either way ``WORKDIR/metrics.jsonl`` is rewritten to the history so far. ``carry_like()`` gives
  the carried state's structure and placement, for a checkpoint taken inside an epoch.

  Raises:
    ValueError: when there are checkpoints but no ``config.resume``, the checkpoint's settings
      differ from ``config``'s (but the learning rate), or no checkpoint verifies.
  """
  workdir = pathlib.Path(config.workdir)
  if not config.resume:
    if checkpoints.manager.all_steps():
      raise ValueError(
        f"{workdir} already holds checkpoints; pass --resume to continue that run, --overwrite "
        "to replace it, or choose a new --workdir"
      )
    write_history(workdir, [])
    return RunState(state, root, [])

  def like(meta: Mapping[str, Any]) -> Any:
    inside = int((meta.get("position") or {}).get("step", 0)) > 0
    return (state, carry_like() if inside else None)

  restored = checkpoints.restore_newest(like)
  if restored is None:
    devices.say(f"--resume: {workdir} holds no run to continue; starting a new one there")
    write_history(workdir, [])
    return RunState(state, root, [])
  (state, carry), meta = restored
  check_same_run(meta["config"], settings.jsonable(config), workdir)
  task.restore_checkpoint_state(meta.get("task", {}))
  inside = meta.get("position") or {}
  run = RunState(
    state=state,
    root=jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32)),
    history=list(meta["history"]),
    epoch=int(meta["epoch"]),
    resumptions=[*meta.get("resumptions", []), _resumption(meta, config)],
    step=int(inside.get("step", 0)),
    carry=carry,
    sums={k: float(v) for k, v in inside.get("sums", {}).items()},
    seconds=float(inside.get("seconds", 0.0)),
  )
  write_history(workdir, run.history)
  devices.say(f"Resumed {workdir} after {position(meta)} of {config.epochs}.")
  return run


def checkpoint_meta(
  run: RunState, task: Task, config: LoopConfig, inside: Mapping[str, Any] | None = None
) -> dict[str, Any]:
  """A checkpoint's metadata: the epoch, history, settings, root key, the task's
  :meth:`Task.checkpoint_state`, the data's identity and the resumptions; inside an epoch also
  its ``position`` (``step``, ``sums``, ``seconds``)."""
  meta = {
    "epoch": run.epoch,
    "history": run.history,
    "config": settings.jsonable(config),
    "rng": np.asarray(jax.random.key_data(run.root)).tolist(),
    "task": task.checkpoint_state(),
    "data": task.describe_data(),
    "resumptions": run.resumptions,
  }
  if inside:
    meta["position"] = dict(inside)
  return meta


def _bytes_on_devices(arrays: Iterable[jax.Array]) -> tuple[int, int]:
  """The most bytes of ``arrays`` that any one device holds, and the bytes of the whole arrays."""
  per_device: dict[Any, int] = {}
  total = 0
  for x in arrays:
    total += x.size * x.dtype.itemsize
    for shard in x.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  most = max(per_device.values(), default=0)
  if jax.process_count() > 1:  # the fullest device of any process (as 8 bytes: no int64 in JAX)
    from jax.experimental import multihost_utils

    mine = np.frombuffer(int(most).to_bytes(8, "little"), np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(mine))
    most = max(int.from_bytes(row.tobytes(), "little") for row in gathered)
  return int(most), int(total)


def state_memory(state: Any) -> dict[str, int]:
  """The bytes of the parameters and of the optimizer state, whole and on the fullest device.

  Measured from the arrays' shards: ``*_bytes_per_device`` is the most that one device holds (a
  replicated array counts whole on every device); ``param_bytes`` and ``optimizer_state_bytes``
  are the arrays' unsplit sizes. ``state`` is the state of (model, optimizer) of
  :func:`examples.training.steps.make_state`; the optimizer state is everything of the optimizer
  (moments, counters).
  """
  model_state, optimizer_state = state[0], state[1]
  params = jax.tree.leaves(nnx.filter_state(model_state, nnx.Param))
  optimizer_arrays = jax.tree.leaves(optimizer_state)
  param_most, param_total = _bytes_on_devices(params)
  state_most, state_total = _bytes_on_devices(optimizer_arrays)
  return {
    "param_bytes": param_total,
    "param_bytes_per_device": param_most,
    "optimizer_state_bytes": state_total,
    "optimizer_state_bytes_per_device": state_most,
  }


def write_run_info(
  task: Task,
  config: LoopConfig,
  setup: optimizers.OptimizerSetup,
  num_params: int,
  mesh: jax.sharding.Mesh,
  run: RunState,
) -> None:
  """Writes ``WORKDIR/run.json``: the config (paths relative to the current folder), the data's
  identity, the optimizer hyperparameters, devices, the mesh and the memory of the state on it
  (:func:`state_memory`), versions, and the resumptions so far.

  Every process of a multi-process run calls it (the memory is measured on all of them); the
  primary one writes the file.
  """
  memory = state_memory(run.state)
  if not devices.is_primary():
    return
  run_info = {
    "config": settings.jsonable(config),
    "task": type(task).__name__,
    "data": task.describe_data(),
    "optimizer": setup.hyperparams,
    "num_params": num_params,
    "devices": [str(d) for d in mesh.devices.flat],
    "process_count": jax.process_count(),
    "mesh": dict(mesh.shape),
    **memory,
    "jax": jax.__version__,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "resumptions": run.resumptions,
  }
  path = pathlib.Path(config.workdir) / metrics.RUN_FILE
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(run_info, indent=2) + "\n")
  os.replace(tmp, path)


def write_stopped(config: LoopConfig, run: RunState, reason: str) -> None:
  """Writes ``WORKDIR/stopped.json`` (the primary process): why the run stopped early."""
  if devices.is_primary():
    path = pathlib.Path(config.workdir) / metrics.STOPPED_FILE
    path.write_text(json.dumps({"after_epoch": run.epoch, "reason": reason}) + "\n")


def clear_stopped(config: LoopConfig) -> None:
  """Removes ``WORKDIR/stopped.json`` when a run (re)starts."""
  if devices.is_primary():
    (pathlib.Path(config.workdir) / metrics.STOPPED_FILE).unlink(missing_ok=True)
