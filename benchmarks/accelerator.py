"""One command for an accelerator: the update-step table, trainer throughput, then gpu-short.

Run from the repository root::

  python -m benchmarks.accelerator --out DIR --data-dir DATA              # ~10 minutes on a GPU
  python -m benchmarks.accelerator --out DIR --data-dir DATA --tiny       # a CPU rehearsal

Three steps, in this order:

1. ``update-step``: the optimizer step on the device, from ``benchmarks/update_speed.py``: Padam
   with ``p = 1/8``, Padam with ``p`` traced (``optax.inject_hyperparams``), ``optax.amsgrad``,
   ``optax.adam`` and the data-movement floor, over the ResNet-18-shaped and the ~100M-parameter
   transformer-shaped trees. Each timed call runs several steps in one jitted loop, so the time
   is the device's, not the launch's. Reported: milliseconds per step and the bytes a step must
   move (each parameter array's gradient, parameters and optimizer state read, parameters and
   state written) per second, against the device's peak memory bandwidth where its kind is in
   :data:`PEAK_BANDWIDTH` ("unknown" otherwise, e.g. on a CPU).
2. ``throughput``: the trainers' own speed, each row one trainer run in a fresh process
   (``examples/cifar10/speed.py``, ``examples/ptb/speed.py``): ResNet-18 images/s in float32 and
   in bfloat16 (``--dtype bfloat16``; a trainer without that flag gets the row skipped, with the
   reason) and the 2-layer AWD-LSTM's tokens/s.
3. ``gpu-short``: the protocol of ``benchmarks/reproduce.py``, its runs in ``DIR/runs/gpu-short/``,
   its table and figure in ``DIR/gpu-short/``.

Each step writes ``DIR/STEP.json`` and ``DIR/STEP.md`` as soon as it finishes (and after each tree,
row or run, so a run cut short keeps what it measured) and rewrites ``DIR/summary.md``: the device,
the versions, each step's status and time, what was not done and why, and the tables. Run again
with the same ``--out``, the command skips the steps that are done (on the same kind of device),
keeps the finished parts of the others, and resumes gpu-short's runs from their checkpoints (a
finished run's checkpoints are deleted: it is never resumed).
``--budget-minutes`` bounds the time: no tree, row or run starts when it would not end in time (a
trainer process still running at the limit is killed), and the summary says what was not done.
The trainers' standard error goes to ``DIR/logs/``.

``--data-dir`` names a folder holding ``cifar10.npz`` and the Penn Treebank files, directly or in
its ``ptb/`` subfolder; without it the trainers' defaults (``$PADAM_DATA_DIR``, then their cache)
are used, with no download. A step or row whose data is missing is skipped, with the reason.

``--tiny`` shrinks everything (the quick update-step trees, a few steps of the smallest models,
and ``gpu-short-tiny``: 2 optimizers, 2 epochs of a half-width ResNet-8 on 256 images), so the
whole kit rehearses end to end on a CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

import padam_jax
from benchmarks import param_trees, protocol_report, protocols, runs, step_timing
from examples import metrics

STEPS = ("update-step", "throughput", "gpu-short")
UPDATE_ROWS = ("padam p=1/8", "padam p traced", "optax amsgrad", "optax adam", "floor (adds only)")
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


def has_dtype_flag() -> bool:
  """Whether the trainers take ``--dtype``, i.e. ``examples.training.LoopConfig.dtype`` exists."""
  from examples import training

  return "dtype" in {f.name for f in dataclasses.fields(training.LoopConfig)}


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


def _now() -> str:
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
    print(f"[kit {time.monotonic() - self.start:6.1f} s] {message}", flush=True)

  def shown(self, text: str) -> str:
    """``text`` with the data folders written as DATA (records name no folder of this machine)."""
    for path in self.data.folders():
      text = text.replace(path, "DATA")
    return text

  def path(self, step: str, suffix: str) -> pathlib.Path:
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
    """Writes the step's JSON and markdown (each replaced whole), then the summary."""
    record = {"step": step, **record, "written": _now(), **self.device}
    for suffix, text in ((".json", json.dumps(record, indent=1) + "\n"), (".md", markdown)):
      tmp = self.path(step, suffix + ".tmp")
      tmp.write_text(text)
      os.replace(tmp, self.path(step, suffix))
    write_summary(self)


def _status(parts: Sequence[dict[str, Any]], expected: int) -> str:
  """A step's status from its parts': done (each part done or skipped for good), partial (a part
  not run yet: the budget, missing data) or failed."""
  if any(p["status"] == "failed" for p in parts):
    return "failed"
  if len(parts) == expected and all(p["status"] in FINAL for p in parts):
    return "done"
  return "partial"


def _kept(previous: dict[str, Any] | None, key: str) -> dict[str, dict[str, Any]]:
  """The parts of an earlier record that are final, by ``key``."""
  if not previous:
    return {}
  return {p[key]: p for p in previous.get("parts", []) if p["status"] in FINAL}


# ---- step 1: the update step ----


def moved_bytes(state_arrays: float, param_bytes: int) -> float:
  """The bytes a step must move at least: per parameter array it reads the gradient, the
  parameters and ``state_arrays`` state arrays and writes the parameters and the state."""
  return (3 + 2 * state_arrays) * param_bytes


def time_tree(kit: Kit, key: str, name: str, shapes: param_trees.Shapes) -> dict[str, Any]:
  """Times the update-step rows on one tree; returns the tree's part of the record."""
  settings = kit.settings
  bench = step_timing.Bench.build(name, shapes, False, settings.steps_per_call)
  rows = step_timing.choose_rows(step_timing.make_rows(False, ()), list(settings.rows))
  step_timing.measure(bench, rows, settings.rounds, settings.calls, kit.log, analyse=False)
  param_bytes = param_trees.tree_bytes(bench.params)
  median = {r.name: float(np.median(r.times)) for r in rows}
  peak = kit.device["peak_bandwidth"]
  out = []
  for r in rows:
    moved = moved_bytes(r.state_arrays, param_bytes)
    q1, q3 = np.percentile(r.times, [25, 75])
    out.append(
      {
        "optimizer": r.name,
        "median_ms": median[r.name] * 1e3,
        "iqr_ms": [float(q1) * 1e3, float(q3) * 1e3],
        "timed_steps": len(r.times) * settings.steps_per_call,
        "moved_bytes": moved,
        "gb_per_s": moved / median[r.name] / 1e9,
        "of_peak": None if peak is None else moved / median[r.name] / peak,
        "vs_floor": median[r.name] / median[FLOOR] if FLOOR in median else None,
        "vs_amsgrad": (
          median[r.name] / median["optax amsgrad"] if "optax amsgrad" in median else None
        ),
        "state_bytes": r.state_bytes,
      }
    )
  return {
    "key": key,
    "status": "done",
    "tree": name,
    "parameters": bench.size,
    "arrays": len(shapes),
    "param_bytes": param_bytes,
    "rows": out,
  }


def _ratio(x: float | None) -> str:
  return "-" if x is None else f"{x:.2f}x"


def update_markdown(kit: Kit, parts: Sequence[dict[str, Any]]) -> str:
  """The update-step tables, one per tree."""
  settings = kit.settings
  peak = kit.device["peak_bandwidth"]
  lines = [
    "## Update step",
    "",
    f"One optimizer step (`update` + `apply_updates`, parameters and state donated) on "
    f"{kit.device['device_kind']}: {settings.steps_per_call} steps per timed call in one jitted "
    f"`lax.fori_loop`, {settings.rounds} interleaved rounds x {settings.calls} calls per row, "
    "median and interquartile range per step. Moved: the bytes a step must read and write at "
    "least (gradient, parameters and state read; parameters and state written); GB/s is that "
    "over the median time, against a peak of "
    + ("unknown (device kind not in the table)" if peak is None else f"{peak / 1e9:,.0f} GB/s")
    + ".",
  ]
  for part in parts:
    if part["status"] != "done":
      lines += ["", f"- {part['tree']}: {part['status']}: {part['reason']}"]
      continue
    lines += [
      "",
      f"### {part['tree']}: {part['parameters']:,} parameters in {part['arrays']} arrays "
      f"({part['param_bytes'] / 1e6:.1f} MB float32)",
      "",
      "| optimizer | median ms | IQR ms | moved MB | GB/s | of peak | vs floor "
      "| vs optax amsgrad |",
      "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in part["rows"]:
      of_peak = "unknown" if r["of_peak"] is None else f"{100 * r['of_peak']:.0f}%"
      lines.append(
        f"| {r['optimizer']} | {r['median_ms']:.3f} | {r['iqr_ms'][0]:.3f}-{r['iqr_ms'][1]:.3f} "
        f"| {r['moved_bytes'] / 1e6:.1f} | {r['gb_per_s']:.1f} | {of_peak} "
        f"| {_ratio(r['vs_floor'])} | {_ratio(r['vs_amsgrad'])} |"
      )
  return "\n".join(lines) + "\n"


def run_update_step(kit: Kit, previous: dict[str, Any] | None) -> None:
  """Step 1: the update-step table on each tree, saved after each."""
  kept = _kept(previous, "key")
  seconds = (previous or {}).get("seconds", 0.0)
  start = time.monotonic()
  estimate = kit.settings.tree_seconds
  parts: list[dict[str, Any]] = []
  for key, name, shapes in kit.settings.trees:
    if key in kept:
      kit.log(f"update-step: {name}: measured in an earlier run, kept")
      parts.append(kept[key])
      continue
    if kit.left() < estimate:
      reason = f"{max(kit.left(), 0):.0f} s of the budget left, a tree takes about {estimate:.0f} s"
      kit.log(f"update-step: {name}: not run ({reason})")
      parts.append({"key": key, "tree": name, "status": "not run", "reason": reason})
      continue
    kit.log(f"update-step: {name}: timing {len(kit.settings.rows)} rows")
    tree_start = time.monotonic()
    parts.append(time_tree(kit, key, name, shapes))
    estimate = max(estimate, time.monotonic() - tree_start)
    elapsed = seconds + time.monotonic() - start
    _save_parts(kit, "update-step", parts, len(kit.settings.trees), elapsed, update_markdown)
  elapsed = seconds + time.monotonic() - start
  _save_parts(kit, "update-step", parts, len(kit.settings.trees), elapsed, update_markdown)


def _save_parts(
  kit: Kit,
  step: str,
  parts: list[dict[str, Any]],
  expected: int,
  seconds: float,
  markdown: Callable[[Kit, Sequence[dict[str, Any]]], str],
) -> None:
  """Saves a step's record: its parts so far (of ``expected``), its status and seconds."""
  status = _status(parts, expected)
  kit.save(step, {"status": status, "seconds": seconds, "parts": parts}, markdown(kit, parts))


# ---- step 2: trainer throughput ----


@dataclasses.dataclass(frozen=True)
class ThroughputRow:
  """One trainer-throughput measurement: a task, a model and a dtype."""

  key: str
  label: str
  task: str
  model: str
  dtype: str
  steps: int
  batch: int


def _throughput_rows(kit: Kit) -> list[ThroughputRow]:
  s = kit.settings
  return [
    ThroughputRow(
      f"cifar10-{dtype}",
      f"CIFAR-10 {s.cifar_model}, {dtype}",
      "cifar10",
      s.cifar_model,
      dtype,
      s.cifar_steps,
      s.cifar_batch,
    )
    for dtype in ("float32", "bfloat16")
  ] + [
    ThroughputRow(
      "ptb-float32",
      f"PTB {s.ptb_model}, float32",
      "ptb",
      s.ptb_model,
      "float32",
      s.ptb_steps,
      s.ptb_batch,
    )
  ]


def _cannot_run(kit: Kit, row: ThroughputRow) -> tuple[str, str]:
  """("skipped" or "not run", why) when ``row`` cannot run on these trainers and data, else
  ("", "")."""
  if row.dtype != "float32" and not has_dtype_flag():
    reason = (
      "the trainers have no --dtype flag yet (examples.training.LoopConfig has no dtype field)"
    )
    return "skipped", reason
  if row.task == "cifar10" and kit.data.cifar is None:
    return "not run", kit.shown(kit.data.cifar_error)
  if row.task == "ptb" and kit.data.ptb is None:
    return "not run", kit.shown(kit.data.ptb_error)
  return "", ""


def _last_line(path: pathlib.Path) -> str:
  lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
  return lines[-1][:300] if lines else "no output"


def measure_row(kit: Kit, row: ThroughputRow, timeout: float) -> dict[str, Any]:
  """Runs one trainer process for ``row``; returns its part of the record: done, failed, or not
  run (killed at the end of the budget)."""
  from examples.cifar10 import speed as cifar_speed
  from examples.ptb import speed as ptb_speed

  extra = ("--dtype", row.dtype) if has_dtype_flag() else ()
  log_path = kit.out / "logs" / f"throughput-{row.key}.log"
  log_path.parent.mkdir(exist_ok=True)
  base = {"key": row.key, "label": row.label, **dataclasses.asdict(row)}
  with open(log_path, "w") as log:
    try:
      if row.task == "cifar10":
        record = cifar_speed.measure(
          row.model,
          row.steps,
          row.batch,
          kit.data.cifar,
          True,
          "padam",
          extra_args=extra,
          timeout=timeout,
          stderr=log,
        )
        rate, unit = record["images_per_second"], "images/s"
      else:
        record = ptb_speed.measure(
          row.model,
          row.steps,
          row.batch,
          kit.data.ptb,
          True,
          "padam",
          kit.settings.ptb_eval_lines,
          extra_args=extra,
          timeout=timeout,
          stderr=log,
        )
        rate, unit = record["tokens_per_second"], "tokens/s"
    except subprocess.TimeoutExpired:
      reason = f"killed at the end of the time budget, after {timeout:.0f} s"
      return {**base, "status": "not run", "reason": reason}
    except subprocess.CalledProcessError as e:
      reason = f"the trainer exited with status {e.returncode}: {kit.shown(_last_line(log_path))}"
      return {**base, "status": "failed", "reason": reason}
  record["command"] = kit.shown(record["command"])
  return {**base, "status": "done", "rate": rate, "unit": unit, **record}


def throughput_markdown(kit: Kit, parts: Sequence[dict[str, Any]]) -> str:
  """The throughput table."""
  lines = [
    "## Trainer throughput",
    "",
    "Each row is one run of the trainer in a fresh process with Padam, one epoch of the steps "
    "shown; the rate counts training only (compilation excluded); wall is the whole process "
    "(start-up, data, compilation, evaluation).",
    "",
    "| row | parameters | batch | steps | rate | wall s | status |",
    "|---|---:|---:|---:|---:|---:|---|",
  ]
  for p in parts:
    if p["status"] == "done":
      lines.append(
        f"| {p['label']} | {p['num_params']:,} | {p['batch']} | {p['steps']} "
        f"| {p['rate']:,.1f} {p['unit']} | {p['wall_seconds']:.1f} | done |"
      )
    else:
      status = f"{p['status']}: {p['reason']}"
      lines.append(f"| {p['label']} | | {p['batch']} | {p['steps']} | | | {status} |")
  return "\n".join(lines) + "\n"


def run_throughput(kit: Kit, previous: dict[str, Any] | None) -> None:
  """Step 2: the trainer-throughput rows, saved after each."""
  kept = _kept(previous, "key")
  seconds = (previous or {}).get("seconds", 0.0)
  start = time.monotonic()
  estimates: dict[str, float] = {}  # a trainer process's seconds, by task, once one was measured
  parts: list[dict[str, Any]] = []
  rows = _throughput_rows(kit)
  for row in rows:
    base = {"key": row.key, "label": row.label, **dataclasses.asdict(row)}
    if row.key in kept and kept[row.key]["status"] == "done":
      kit.log(f"throughput: {row.label}: measured in an earlier run, kept")
      parts.append(kept[row.key])
      continue
    status, reason = _cannot_run(kit, row)
    estimate = estimates.get(row.task, kit.settings.trainer_seconds)
    if status:
      kit.log(f"throughput: {row.label}: {status} ({reason})")
      parts.append({**base, "status": status, "reason": reason})
    elif kit.left() < estimate:
      reason = f"{max(kit.left(), 0):.0f} s of the budget left, a run takes about {estimate:.0f} s"
      kit.log(f"throughput: {row.label}: not run ({reason})")
      parts.append({**base, "status": "not run", "reason": reason})
    else:
      kit.log(f"throughput: {row.label}: {row.steps} steps of batch {row.batch}")
      part = measure_row(kit, row, timeout=kit.left())
      shown = f"{part['rate']:,.1f} {part['unit']}" if "rate" in part else part["reason"]
      kit.log(f"throughput: {row.label}: {part['status']}, {shown}")
      estimates[row.task] = part.get("wall_seconds", estimate)
      parts.append(part)
    elapsed = seconds + time.monotonic() - start
    _save_parts(kit, "throughput", parts, len(rows), elapsed, throughput_markdown)


# ---- step 3: gpu-short ----


@dataclasses.dataclass
class EpochCost:
  """What a training call of the protocol costs: seconds to start (build, compile, restore) and
  per epoch (training, evaluation, checkpoint).

  Guesses (``epoch`` None when there is none) until a call of this kit run was observed; from then
  on, the largest observed.
  """

  start: float
  epoch: float | None = None
  observed: bool = False

  def plan(self, left: float, remaining: int) -> int:
    """Epochs of a run that fit in ``left`` seconds, at most ``remaining`` (1, a probe, while the
    epoch's cost is not known)."""
    if left < self.start + (self.epoch or 0.0):
      return 0
    if self.epoch is None:
      return 1
    return min(remaining, math.floor((left - self.start) / self.epoch))

  def observe(self, records: Sequence[dict[str, Any]], wall: float) -> None:
    """Learns from one training call: the records of the epochs it trained and its wall time."""
    if not records:
      return
    epoch = 1.1 * max(r["epoch_seconds"] for r in records)
    start = max(0.0, wall - sum(r["epoch_seconds"] for r in records))
    if self.observed:
      epoch, start = max(epoch, self.epoch or 0.0), max(start, self.start)
    self.epoch, self.start, self.observed = epoch, start, True


def initial_cost(kit: Kit, protocol: protocols.Protocol) -> EpochCost:
  """The first guess of a training call's cost.

  The epoch: from earlier runs' metrics in the output folder, else from the throughput row of the
  same model (training at its rate, evaluation at three times it), else unknown. The start: the
  throughput row's process time outside training, else the settings' ``trainer_seconds``.
  """
  records = []
  for variant in protocol.variants:
    try:
      records += metrics.read_metrics(protocols.run_dir(protocol, variant, 0, kit.out))
    except FileNotFoundError:
      pass
  cost = EpochCost(start=kit.settings.trainer_seconds)
  if records:
    cost.epoch = 1.1 * max(r["epoch_seconds"] for r in records)
  for part in _records(kit).get("throughput", {}).get("parts", []):
    if (
      part["status"] == "done"
      and part["key"] == "cifar10-float32"
      and part["model"] == protocol.config["model"]
    ):
      config = protocol.config
      images = config.get("train_size") or 50_000
      tested = config.get("test_size") or 10_000
      cost.epoch = cost.epoch or 1.2 * (images + tested / 3) / part["rate"]
      cost.start = part["wall_seconds"] - part["train_seconds"]
  return cost


def gpu_short_markdown(kit: Kit, parts: Sequence[dict[str, Any]]) -> str:
  protocol = kit.settings.protocol
  lines = [
    f"## {protocol.name}",
    "",
    protocol.about,
    "",
    f"Runs in `runs/{protocol.setting}/`, report and figure in `{protocol.name}/`.",
    "",
  ]
  lines += [
    f"- {p['label']}: {p['epochs_done']}/{p['epochs']} epochs"
    + ("" if p["status"] == "done" else f", {p['status']}: {p['reason']}")
    for p in parts
  ]
  lines += ["", protocol_report.table(protocol, 1, kit.out)]
  figure = kit.out / protocol.name / "figure2_curves.png"
  if figure.is_file():
    lines += [f"![{protocol.name} curves]({protocol.name}/figure2_curves.png)", ""]
  return "\n".join(lines)


def _epochs_done(kit: Kit, protocol: protocols.Protocol, variant: protocols.Variant) -> int:
  try:
    return len(metrics.read_metrics(protocols.run_dir(protocol, variant, 0, kit.out)))
  except FileNotFoundError:
    return 0


def train_variant(
  kit: Kit, protocol: protocols.Protocol, variant: protocols.Variant, cost: EpochCost
) -> dict[str, Any]:
  """Trains one run of the protocol, in as many calls as the budget allows; returns its part."""
  from examples import training

  epochs = protocol.config["epochs"]
  part = {"label": variant.label, "epochs": epochs}
  while (done := _epochs_done(kit, protocol, variant)) < epochs:
    count = cost.plan(kit.left(), epochs - done)
    if count < 1:
      need = cost.start + (cost.epoch or 0.0)
      left = max(kit.left(), 0)
      reason = (
        f"{left:.0f} s of the budget left, a call to train one epoch takes about {need:.0f} s"
      )
      return {**part, "epochs_done": done, "status": "not run", "reason": reason}
    overrides = {"stop_after_epoch": done + count} if done + count < epochs else {}
    kit.log(f"{protocol.name}: {variant.label}: epochs {done + 1}-{done + count} of {epochs}")
    start = time.monotonic()
    try:
      runs.train_run(
        protocol,
        variant,
        0,
        data_dir=kit.data.cifar,
        root=kit.out,
        overrides=overrides,
        progress=False,
      )
    except (ValueError, FileNotFoundError, training.NonFiniteLossError) as e:
      reason = kit.shown(str(e).splitlines()[0] if str(e) else type(e).__name__)
      return {**part, "epochs_done": done, "status": "failed", "reason": reason}
    history = metrics.read_metrics(protocols.run_dir(protocol, variant, 0, kit.out))
    if len(history) <= done:
      reason = f"the trainer returned after epoch {len(history)} without training epoch {done + 1}"
      return {**part, "epochs_done": len(history), "status": "failed", "reason": reason}
    cost.observe(history[done:], time.monotonic() - start)
    protocol_report.write_report(protocol, seeds=1, root=kit.out)
  # A finished run is never resumed: its checkpoints would only make the folder heavier.
  shutil.rmtree(
    protocols.run_dir(protocol, variant, 0, kit.out) / "checkpoints", ignore_errors=True
  )
  return {**part, "epochs_done": epochs, "status": "done"}


def run_gpu_short(kit: Kit, previous: dict[str, Any] | None) -> None:
  """Step 3: the training comparison, run by run, each resumed from its checkpoint on a rerun."""
  protocol = kit.settings.protocol
  seconds = (previous or {}).get("seconds", 0.0)
  start = time.monotonic()
  variants = runs.select_variants(protocol)
  if kit.data.cifar is None:
    reason = kit.shown(kit.data.cifar_error)
    kit.log(f"{protocol.name}: not run ({reason})")
    parts = [
      {"label": v.label, "epochs": protocol.config["epochs"], "epochs_done": 0}
      | {"status": "not run", "reason": reason}
      for v in variants
    ]
    _save_parts(kit, "gpu-short", parts, len(variants), seconds, gpu_short_markdown)
    return
  cost = initial_cost(kit, protocol)
  parts: list[dict[str, Any]] = []
  for index, variant in enumerate(variants):
    part = train_variant(kit, protocol, variant, cost)
    parts.append(part)
    if part["status"] == "not run":  # the budget is spent: the others are not run either
      parts += [
        {**part, "label": v.label, "epochs_done": _epochs_done(kit, protocol, v)}
        for v in variants[index + 1 :]
      ]
      break
    elapsed = seconds + time.monotonic() - start
    _save_parts(kit, "gpu-short", parts, len(variants), elapsed, gpu_short_markdown)
  if any(p["epochs_done"] for p in parts):
    protocol_report.write_report(protocol, seeds=1, root=kit.out)
  elapsed = seconds + time.monotonic() - start
  _save_parts(kit, "gpu-short", parts, len(variants), elapsed, gpu_short_markdown)


STEP_FUNCTIONS: dict[str, Callable[[Kit, dict[str, Any] | None], None]] = {
  "update-step": run_update_step,
  "throughput": run_throughput,
  "gpu-short": run_gpu_short,
}


# ---- the summary ----


def _records(kit: Kit) -> dict[str, dict[str, Any]]:
  records = {}
  for step in STEPS:
    try:
      records[step] = json.loads(kit.path(step, ".json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
      pass
  return records


def _not_done(step: str, record: dict[str, Any]) -> list[str]:
  return [
    f"- {step}: {p.get('tree') or p.get('label')}: {p['status']}: {p['reason']}"
    for p in record.get("parts", [])
    if p["status"] != "done"
  ]


def write_summary(kit: Kit) -> None:
  """Rewrites ``DIR/summary.md`` from the step records in the folder."""
  device = kit.device
  peak = device["peak_bandwidth"]
  records = _records(kit)
  lines = [
    f"# Accelerator kit: {device['device_kind']}",
    "",
    f"- command: `{kit.command}`",
    f"- device: {device['device_kind']} ({device['platform']}, {device['device_count']} "
    f"device(s)); peak memory bandwidth "
    + ("unknown" if peak is None else f"{peak / 1e12:g} TB/s (published figure)"),
    f"- versions: jax {device['jax']}, jaxlib {device['jaxlib']}, flax {device['flax']}, "
    f"optax {device['optax']}, padam_jax {device['padam_jax']}, Python {device['python']}",
    f"- budget: {kit.budget_seconds / 60:g} min; this run used "
    f"{time.monotonic() - kit.start:.0f} s so far; written {_now()}",
    "",
    "| step | status | seconds | device | files |",
    "|---|---|---:|---|---|",
  ]
  missing = []
  for step in STEPS:
    record = records.get(step)
    if record is None:
      lines.append(f"| {step} | not run | | | |")
      continue
    lines.append(
      f"| {step} | {record['status']} | {record['seconds']:.1f} | {record['device_kind']} "
      f"| {step}.json, {step}.md |"
    )
    missing += _not_done(step, record)
  if missing:
    lines += ["", "Not done:", "", *missing]
  for step in STEPS:
    if step in records and kit.path(step, ".md").is_file():
      lines += ["", kit.path(step, ".md").read_text().rstrip()]
  tmp = kit.out / "summary.md.tmp"
  tmp.write_text("\n".join(lines) + "\n")
  os.replace(tmp, kit.out / "summary.md")


# ---- running it ----


def run_kit(kit: Kit, steps: Sequence[str] = STEPS) -> int:
  """Runs ``steps`` (in the kit's order), skipping those done; returns 1 if any part failed."""
  kit.log(
    f"device {kit.device['device_kind']} ({kit.device['platform']}), jax {kit.device['jax']}, "
    f"budget {kit.budget_seconds:.0f} s, output {kit.out}"
  )
  for step in STEPS:
    if step not in steps:
      continue
    previous = kit.load(step)
    if previous is not None and previous["status"] in FINAL:
      kit.log(f"{step}: {previous['status']} in an earlier run, skipped")
      continue
    kit.log(f"{step}: starting, {max(kit.left(), 0):.0f} s of the budget left")
    STEP_FUNCTIONS[step](kit, previous)
  write_summary(kit)
  records = _records(kit)
  for step, record in records.items():
    for line in _not_done(step, record):
      kit.log(f"not done: {line[2:]}")
  kit.log(f"summary: {kit.out / 'summary.md'}")
  return 1 if any(r["status"] == "failed" for r in records.values()) else 0


def _command(argv: Sequence[str], data_dir: str | None) -> str:
  text = shlex.join(["python", "-m", "benchmarks.accelerator", *argv])
  return text.replace(data_dir, "DATA") if data_dir else text


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.accelerator", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--out", required=True, metavar="DIR", help="output folder (resumable)")
  parser.add_argument(
    "--data-dir",
    default=None,
    metavar="DIR",
    help="folder holding cifar10.npz and the PTB files (directly or in ptb/)",
  )
  parser.add_argument("--tiny", action="store_true", help="tiny sizes: a rehearsal on a CPU")
  parser.add_argument(
    "--budget-minutes",
    type=float,
    default=9.0,
    help="stop starting work that would not end within this time (default: %(default)s)",
  )
  parser.add_argument(
    "--only", nargs="+", choices=STEPS, default=STEPS, metavar="STEP", help="run only these steps"
  )
  parser.add_argument(
    "--redo",
    nargs="+",
    choices=STEPS,
    default=(),
    metavar="STEP",
    help="run these steps again even when done (gpu-short's finished runs are still kept)",
  )
  args = parser.parse_args(argv)
  if not args.budget_minutes > 0:
    parser.error(f"--budget-minutes must be > 0, got {args.budget_minutes}")
  # Before JAX starts its backend: this process allocates device memory as it needs it, leaving
  # the rest to the trainer processes; XNNPACK on a CPU, as the trainers have it.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  from examples import cli

  cli.configure_xla([])
  settings = tiny_settings() if args.tiny else full_settings()
  kit = Kit(
    args.out,
    settings,
    find_data(args.data_dir),
    args.budget_minutes * 60,
    command=_command(sys.argv[1:] if argv is None else argv, args.data_dir),
    redo=args.redo,
  )
  return run_kit(kit, args.only)


if __name__ == "__main__":
  sys.exit(main())
