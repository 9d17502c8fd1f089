"""The accelerator kit's three steps: the update step, the trainers' throughput, gpu-short.

Each step function (:data:`STEP_FUNCTIONS`) takes the :class:`benchmarks.kit.Kit` and the step's
record from an earlier run (or None), keeps the parts of it that are final, does the others that
fit in the budget, and saves the record after each part (:func:`save_parts`), with its table and
the summary (:mod:`benchmarks.kit_report`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks import param_trees, protocol_report, protocols, runs, step_timing
from benchmarks.kit import FLOOR, Kit, kept_parts, step_status
from benchmarks.kit_report import (
  gpu_short_markdown,
  throughput_markdown,
  update_markdown,
  write_summary,
)
from examples import metrics

# ---- step 1: the update step ----


def moved_bytes(state_array_bytes: int, param_bytes: int) -> float:
  """The bytes a step must move at least: it reads the gradient, the parameters and the state's
  arrays (``state_array_bytes``, in whatever dtype they are kept) and writes the parameters and
  the state."""
  return 3 * param_bytes + 2 * state_array_bytes


def time_tree(kit: Kit, key: str, name: str, shapes: param_trees.Shapes) -> dict[str, Any]:
  """Times the update-step rows on one tree; returns the tree's part of the record."""
  settings = kit.settings
  bench = step_timing.Bench.build(name, shapes, False, settings.steps_per_call)
  rows = step_timing.choose_rows(step_timing.make_rows(False, ()), list(settings.rows))
  step_timing.measure(bench, rows, settings.rounds, settings.calls, kit.log, analyse=True)
  param_bytes = param_trees.tree_bytes(bench.params)
  median = {r.name: float(np.median(r.times)) for r in rows}
  peak = kit.device["peak_bandwidth"]
  out = []
  for r in rows:
    moved = moved_bytes(r.state_array_bytes, param_bytes)
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
        # XLA's analyses of the compiled call (steps_per_call steps in one loop).
        "temp_bytes": None if r.kind == "torch" else r.temp_bytes,
        "bytes_accessed": None if r.kind == "torch" else r.bytes_accessed,
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


def run_update_step(kit: Kit, previous: dict[str, Any] | None) -> None:
  """Step 1: the update-step table on each tree, saved after each."""
  kept = kept_parts(previous, "key")
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
    save_parts(kit, "update-step", parts, len(kit.settings.trees), elapsed, update_markdown)
  elapsed = seconds + time.monotonic() - start
  save_parts(kit, "update-step", parts, len(kit.settings.trees), elapsed, update_markdown)


def save_parts(
  kit: Kit,
  step: str,
  parts: list[dict[str, Any]],
  expected: int,
  seconds: float,
  markdown: Callable[[Kit, Sequence[dict[str, Any]]], str],
) -> None:
  """Saves a step's record: its parts so far (of ``expected``), its status and seconds; then
  rewrites the summary."""
  status = step_status(parts, expected)
  kit.save(step, {"status": status, "seconds": seconds, "parts": parts}, markdown(kit, parts))
  write_summary(kit)


@dataclasses.dataclass(frozen=True)
class ThroughputRow:
  """One trainer-throughput measurement: a task, a model, a dtype and the steps per call (None:
  the trainers' default)."""

  key: str
  label: str
  task: str
  model: str
  dtype: str
  steps: int
  batch: int
  steps_per_call: int | None = None


def _throughput_rows(kit: Kit) -> list[ThroughputRow]:
  s = kit.settings
  return (
    [
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
    ]
    + [
      # One step a call, as the trainers ran before --steps-per-call: the default's gain.
      ThroughputRow(
        "cifar10-float32-1",
        f"CIFAR-10 {s.cifar_model}, float32, 1 step a call",
        "cifar10",
        s.cifar_model,
        "float32",
        s.cifar_steps,
        s.cifar_batch,
        steps_per_call=1,
      )
    ]
    + [
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
  )


def _cannot_run(kit: Kit, row: ThroughputRow) -> tuple[str, str]:
  """("skipped" or "not run", why) when ``row`` cannot run on these trainers and data, else
  ("", "")."""
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

  extra = ("--dtype", row.dtype)
  if row.steps_per_call is not None:
    extra += ("--steps-per-call", str(row.steps_per_call))
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


def run_throughput(kit: Kit, previous: dict[str, Any] | None) -> None:
  """Step 2: the trainer-throughput rows, saved after each."""
  kept = kept_parts(previous, "key")
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
    save_parts(kit, "throughput", parts, len(rows), elapsed, throughput_markdown)


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
  for part in kit.records().get("throughput", {}).get("parts", []):
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
    save_parts(kit, "gpu-short", parts, len(variants), seconds, gpu_short_markdown)
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
    save_parts(kit, "gpu-short", parts, len(variants), elapsed, gpu_short_markdown)
  if any(p["epochs_done"] for p in parts):
    protocol_report.write_report(protocol, seeds=1, root=kit.out)
  elapsed = seconds + time.monotonic() - start
  save_parts(kit, "gpu-short", parts, len(variants), elapsed, gpu_short_markdown)


STEP_FUNCTIONS: dict[str, Callable[[Kit, dict[str, Any] | None], None]] = {
  "update-step": run_update_step,
  "throughput": run_throughput,
  "gpu-short": run_gpu_short,
}
