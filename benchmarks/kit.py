"""The accelerator kit's frame: its sizes, the device, the data, and its output folder and budget.

:class:`Settings` holds the sizes of a kit run (:func:`full_settings` for an accelerator,
:func:`tiny_settings` for a CPU rehearsal), :func:`device_info` and :func:`peak_bandwidth` describe
the device, :func:`find_data` finds the datasets, and :class:`Kit` holds a run's output folder,
time budget and the step records there. The steps themselves are in :mod:`benchmarks.kit_steps`,
their tables and the summary in :mod:`benchmarks.kit_report`, the command in
:mod:`benchmarks.accelerator`.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import time
from collections.abc import Sequence
from typing import Any

import jax

import padam_jax
from benchmarks import param_trees, protocols

STEPS = ("update-step", "throughput", "gpu-short")
UPDATE_ROWS = (
  "padam p=1/8",
  "padam p traced",
  "padam p=1/8, bf16 state",
  "padam p=1/8, 8-bit state",
  "optax amsgrad",
  "optax adam",
  "floor (adds only)",
)
FLOOR = "floor (adds only)"
# Statuses of a tree, row or run: "done"; "skipped" for good (the trainers lack a flag); "not run"
# (the budget was spent, the data is missing) and "failed" are tried again on a rerun.
FINAL = ("done", "skipped")

# Peak memory bandwidth in bytes per second by device kind (the vendors' published figures). The
# first entry whose text is in ``jax.Device.device_kind`` (case-insensitive) applies.
PEAK_BANDWIDTH: tuple[tuple[str, float], ...] = (
  ("H200", 4.8e12),
  ("H100 NVL", 3.9e12),
  ("H100 PCIe", 2.0e12),
  ("H100", 3.35e12),  # SXM: "NVIDIA H100 80GB HBM3"
  ("A100-SXM4-80GB", 2.039e12),
  ("A100 80GB PCIe", 1.935e12),
  ("A100", 1.555e12),  # 40 GB
  ("TPU v4", 1.2e12),
  ("TPU v5 lite", 8.2e11),  # v5e
  ("TPU v5e", 8.2e11),
  ("TPU v5p", 2.76e12),
  ("TPU v5", 2.76e12),
)


def peak_bandwidth(device_kind: str) -> float | None:
  """The peak memory bandwidth (bytes/s) of a device kind, or None when it is not known.

  Examples:
    >>> peak_bandwidth("NVIDIA H200")
    4800000000000.0
    >>> peak_bandwidth("cpu") is None
    True
  """
  for name, bandwidth in PEAK_BANDWIDTH:
    if name.lower() in device_kind.lower():
      return bandwidth
  return None


@dataclasses.dataclass(frozen=True)
class Settings:
  """The sizes of a kit run.

  Attributes:
    trees: (key, heading, shapes) of the update-step trees.
    rows: the update-step rows, by ``benchmarks/update_speed.py`` name.
    rounds, calls, steps_per_call: interleaved rounds, timed calls per row per round, optimizer
      steps per call.
    cifar_model, cifar_steps, cifar_batch: the CIFAR-10 throughput runs.
    ptb_model, ptb_steps, ptb_batch, ptb_eval_lines: the PTB throughput run.
    protocol: the training comparison (``gpu-short``).
    tree_seconds, trainer_seconds: how long a tree and a trainer process are expected to take
      before one was measured (the budget keeps this much for them).
    margin_seconds: time kept at the end of the budget for the last reports.
  """

  trees: tuple[tuple[str, str, param_trees.Shapes], ...]
  protocol: protocols.Protocol
  rows: tuple[str, ...] = UPDATE_ROWS
  rounds: int = 7
  calls: int = 5
  steps_per_call: int = 50
  cifar_model: str = "resnet18"
  cifar_steps: int = 150
  cifar_batch: int = 128
  ptb_model: str = "lstm2"
  ptb_steps: int = 60
  ptb_batch: int = 20
  ptb_eval_lines: int = 20
  tree_seconds: float = 60.0
  trainer_seconds: float = 90.0
  margin_seconds: float = 15.0


def full_settings() -> Settings:
  """The accelerator sizes: ResNet-18 and the 98.4M-parameter transformer tree, gpu-short."""
  return Settings(trees=tuple(param_trees.trees()), protocol=protocols.PROTOCOLS["gpu-short"])


def tiny_settings() -> Settings:
  """A CPU rehearsal: the quick trees, a few steps of the smallest models, gpu-short-tiny."""
  return Settings(
    trees=tuple(param_trees.trees(quick=True)),
    protocol=protocols.PROTOCOLS["gpu-short-tiny"],
    rounds=2,
    calls=3,
    steps_per_call=5,
    cifar_model="resnet8_w0.5",
    cifar_steps=5,
    cifar_batch=32,
    ptb_model="lstm2-tiny",
    ptb_steps=5,
    ptb_batch=20,
    ptb_eval_lines=10,
    tree_seconds=30.0,
    trainer_seconds=30.0,
    margin_seconds=5.0,
  )


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def device_info() -> dict[str, Any]:
  """The device kind, platform and count, its peak bandwidth, and the versions in use."""
  devices = jax.devices()
  kind = devices[0].device_kind
  return {
    "device_kind": kind,
    "platform": devices[0].platform,
    "device_count": len(devices),
    "peak_bandwidth": peak_bandwidth(kind),
    "jax": jax.__version__,
    "jaxlib": _version("jaxlib"),
    "flax": _version("flax"),
    "optax": _version("optax"),
    "padam_jax": padam_jax.__version__,
    "python": platform.python_version(),
  }


@dataclasses.dataclass(frozen=True)
class Data:
  """Where the datasets are, or why they are not there.

  Attributes:
    given: the folder named on the command line, or None.
    cifar: the folder of ``cifar10.npz`` (None when not found).
    ptb: the folder of the PTB files (None when not found).
    cifar_error, ptb_error: why a folder was not found.
  """

  given: str | None
  cifar: str | None
  ptb: pathlib.Path | None
  cifar_error: str = ""
  ptb_error: str = ""

  def folders(self) -> list[str]:
    """The folders named here that are paths (not a bare name), the longest first."""
    found = {str(p) for p in (self.given, self.cifar, self.ptb) if p and os.sep in str(p)}
    return sorted(found, key=len, reverse=True)


def find_data(data_dir: str | None) -> Data:
  """Finds CIFAR-10 and PTB in ``data_dir`` (PTB directly or in ``ptb/``), else the trainers'
  defaults, downloading nothing."""
  from examples.cifar10 import input_pipeline as cifar_input
  from examples.ptb import input_pipeline as ptb_input

  cifar = ptb = None
  cifar_error = ptb_error = ""
  try:
    cifar = str(cifar_input.resolve_data_file(data_dir, download=False).parent)
  except cifar_input.DataError as e:
    cifar_error = str(e).split(". ")[0]
  folder = data_dir
  if data_dir and (pathlib.Path(data_dir) / "ptb").is_dir():
    folder = str(pathlib.Path(data_dir) / "ptb")
  try:
    ptb = ptb_input.resolve_data_dir(folder, download_missing=False)
  except ptb_input.DataError as e:
    ptb_error = str(e).split(". ")[0]
  return Data(data_dir, cifar, ptb, cifar_error, ptb_error)


def now() -> str:
  """The time, in UTC, as the records and the summary show it."""
  return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Kit:
  """A kit run: its settings, output folder, data, device, time budget and step records.

  Args:
    out: the output folder.
    settings: the sizes.
    data: where the datasets are.
    budget_seconds: the time this run may take, from now.
    command: the command line, as the summary shows it.
    redo: steps to run again even when done.
  """

  def __init__(
    self,
    out: str | os.PathLike,
    settings: Settings,
    data: Data,
    budget_seconds: float,
    command: str = "",
    redo: Sequence[str] = (),
  ):
    self.out = pathlib.Path(out)
    self.out.mkdir(parents=True, exist_ok=True)
    self.settings = settings
    self.data = data
    self.budget_seconds = budget_seconds
    self.start = time.monotonic()
    self.deadline = self.start + budget_seconds
    self.command = command
    self.redo = tuple(redo)
    self.device = device_info()

  def left(self) -> float:
    """Seconds of the budget left, less the margin kept for the last reports."""
    return self.deadline - time.monotonic() - self.settings.margin_seconds

  def log(self, message: str) -> None:
    """Prints ``message`` with the seconds since the kit run started."""
    print(f"[kit {time.monotonic() - self.start:6.1f} s] {message}", flush=True)

  def shown(self, text: str) -> str:
    """``text`` with the data folders written as DATA (records name no folder of this machine)."""
    for path in self.data.folders():
      text = text.replace(path, "DATA")
    return text

  def path(self, step: str, suffix: str) -> pathlib.Path:
    """The step's file with ``suffix`` (``.json``, ``.md``) in the output folder."""
    return self.out / f"{step}{suffix}"

  def load(self, step: str) -> dict[str, Any] | None:
    """The step's record from an earlier run on the same kind of device, or None."""
    try:
      record = json.loads(self.path(step, ".json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
      return None
    if record.get("device_kind") != self.device["device_kind"] or step in self.redo:
      return None
    return record

  def save(self, step: str, record: dict[str, Any], markdown: str) -> None:
    """Writes the step's JSON and markdown (each replaced whole)."""
    record = {"step": step, **record, "written": now(), **self.device}
    for suffix, text in ((".json", json.dumps(record, indent=1) + "\n"), (".md", markdown)):
      tmp = self.path(step, suffix + ".tmp")
      tmp.write_text(text)
      os.replace(tmp, self.path(step, suffix))

  def records(self) -> dict[str, dict[str, Any]]:
    """The step records in the output folder, by step, whatever device wrote them."""
    records = {}
    for step in STEPS:
      try:
        records[step] = json.loads(self.path(step, ".json").read_text())
      except (FileNotFoundError, json.JSONDecodeError):
        pass
    return records


def step_status(parts: Sequence[dict[str, Any]], expected: int) -> str:
  """A step's status from its parts': done (each part done or skipped for good), partial (a part
  not run yet: the budget, missing data) or failed."""
  if any(p["status"] == "failed" for p in parts):
    return "failed"
  if len(parts) == expected and all(p["status"] in FINAL for p in parts):
    return "done"
  return "partial"


def kept_parts(previous: dict[str, Any] | None, key: str) -> dict[str, dict[str, Any]]:
  """The parts of an earlier record that are final, by ``key``."""
  if not previous:
    return {}
  return {p[key]: p for p in previous.get("parts", []) if p["status"] in FINAL}
