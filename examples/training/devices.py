"""Devices and processes: the run's ``data`` x ``fsdp`` mesh, where each array of the state lives on
it, and the few things every process of a multi-process run does alike (who prints, waiting for
the others, reading a split array whole).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# The axes of every run's mesh, in this order; a batch is split over all of them (over every device).
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
# Under ``--mesh ...,fsdp=K`` (K > 1), arrays of the state with at least this many elements are
# split over the fsdp axis; smaller ones (biases, BatchNorm statistics, counters, keys) are replicated.
FSDP_MIN_SIZE = 4096


def parse_mesh(text: str) -> dict[str, int]:
  """The axis sizes of ``--mesh``: ``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}``.

  An axis left out has size 1.

  Raises:
    ValueError: one line naming ``--mesh``, the value and what is valid, for bad syntax, an unknown
      or repeated axis, or a size that is not a positive integer.
  """
  valid = (
    "expected AXIS=SIZE pairs joined by commas over the axes data and fsdp, e.g. data=2,fsdp=4"
  )
  if not isinstance(text, str):
    raise ValueError(f"--mesh {text!r} is not valid; {valid}")
  sizes: dict[str, int] = {}
  for part in text.split(","):
    name, sep, value = (x.strip() for x in part.partition("="))
    if not sep or not name:
      raise ValueError(f"--mesh {text!r} is not valid; {valid}")
    if name not in MESH_AXES:
      raise ValueError(f"--mesh {text!r} is not valid; unknown axis {name!r} ({valid})")
    if name in sizes:
      raise ValueError(f"--mesh {text!r} is not valid; axis {name!r} is given twice")
    if not value.isdigit() or int(value) < 1:
      raise ValueError(
        f"--mesh {text!r} is not valid; the size of {name!r} must be a positive integer"
      )
    sizes[name] = int(value)
  return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def mesh_sizes(mesh: str | None, count: int) -> dict[str, int]:
  """The size of each axis of :data:`MESH_AXES` for a run on ``count`` devices.

  Args:
    mesh: the ``--mesh`` text, or None for every device on ``data`` (the state replicated).
    count: the number of devices the run uses.

  Raises:
    ValueError: when ``mesh`` is not valid (:func:`parse_mesh`) or its sizes do not multiply to
      ``count``.
  """
  if mesh is None:
    return {DATA_AXIS: count, FSDP_AXIS: 1}
  sizes = parse_mesh(mesh)
  product = math.prod(sizes.values())
  if product != count:
    raise ValueError(
      f"--mesh {mesh} is not valid; its sizes multiply to {product}, but the run uses {count} "
      "devices (all there are, or --devices)"
    )
  return sizes


def make_mesh(
  devices: int | None = None, mesh: str | None = None, available: list[Any] | None = None
) -> jax.sharding.Mesh:
  """The run's ``data`` x ``fsdp`` mesh over the first ``devices`` devices (all by default).

  Args:
    devices: how many devices, or None for all of them (of every process).
    mesh: the ``--mesh`` text (:func:`mesh_sizes`), or None for every device on ``data``.
    available: the devices to choose from (default: ``jax.devices()``), e.g. the chips of a TPU
      topology that is compiled for without being attached.
  """
  available = jax.devices() if available is None else list(available)
  count = len(available) if devices is None else devices
  if not 0 < count <= len(available):
    raise ValueError(f"asked for {devices} devices; {len(available)} are available")
  sizes = mesh_sizes(mesh, count)
  return jax.make_mesh(
    tuple(sizes[axis] for axis in MESH_AXES),
    MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    devices=available[:count],
  )


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """Where an array of ``shape`` lives on a mesh whose ``fsdp`` axis has ``fsdp`` devices.

  It is split over ``fsdp`` along its largest dimension that ``fsdp`` divides (the first of equal
  ones); it is replicated when ``fsdp`` is 1, when it has fewer than ``min_size`` elements, or when
  no dimension divides. An optimizer's per-parameter state (Padam's ``mu``, ``nu``, ``nu_max``) has
  its parameter's shape, so it is split as its parameter is.

  Examples:
    >>> fsdp_spec((3, 3, 64, 128), 4)
    P(None, None, None, 'fsdp')
    >>> fsdp_spec((128,), 4), fsdp_spec((30, 501), 4)
    (P(), P())
  """
  if fsdp == 1 or math.prod(shape) < min_size:
    return P()
  divisible = [d for d, n in enumerate(shape) if n % fsdp == 0]
  if not divisible:
    return P()
  split = max(divisible, key=lambda d: shape[d])
  return P(*(FSDP_AXIS if d == split else None for d in range(len(shape))))


def state_shardings(state: Any, mesh: jax.sharding.Mesh) -> Any:
  """A NamedSharding per array of ``state`` (arrays or ``jax.ShapeDtypeStruct``), by :func:`fsdp_spec`."""
  fsdp = mesh.shape[FSDP_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp)), state)


def is_primary() -> bool:
  """Whether this is the process that writes metrics.jsonl and run.json and prints (process 0)."""
  return jax.process_index() == 0


def say(message: str) -> None:
  """Prints ``message`` on stderr, from the primary process only (:func:`is_primary`)."""
  if is_primary():
    print(message, file=sys.stderr, flush=True)


def sync_processes(name: str) -> None:
  """Waits until every process of a multi-process run got here (nothing in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def all_processes(flag: bool) -> list[bool]:
  """``flag`` of every process, in process order (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return [bool(flag)]
  from jax.experimental import multihost_utils

  gathered = multihost_utils.process_allgather(np.asarray(flag, np.int32))
  return [bool(x) for x in np.asarray(gathered).reshape(-1)]


def host_value(x: Any) -> np.ndarray:
  """The whole of array ``x`` on the host of every process.

  An array split over the devices of several processes is gathered (collectively: every process
  must call this for the same arrays in the same order); a replicated one is read locally.
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """The global array ``x`` (the same on every process) placed as ``sharding`` says; each process
  places only the rows of its own devices."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
