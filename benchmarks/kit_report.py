"""The accelerator kit's report: each step's markdown table and ``DIR/summary.md``.

The tables are written from a step's parts (the record :mod:`benchmarks.kit_steps` saves) and the
summary from the step records in the output folder alone, so either can be rewritten at any time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.kit import STEPS, Kit, now
from benchmarks.protocol_report import table


def _ratio(x: float | None) -> str:
  return "-" if x is None else f"{x:.2f}x"


def _memory_cells(row: dict[str, Any]) -> str:
  """State, temporaries, their sum (MB) and bytes accessed (GB) of an update-step row; a record
  from before these were measured, or a PyTorch row, has dashes."""
  state, temps, accessed = row["state_bytes"], row.get("temp_bytes"), row.get("bytes_accessed")
  if temps is None:
    return f"{state / 1e6:.1f} | - | - | -"
  return (
    f"{state / 1e6:.1f} | {temps / 1e6:.1f} | {(state + temps) / 1e6:.1f} | {accessed / 1e9:.2f}"
  )


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
    + ". State: the optimizer state's bytes; temporaries: the compiled call's scratch buffers "
    "(XLA's memory analysis), so state + temporaries is what the state costs at the update's "
    "peak; GB accessed: XLA's cost model for one compiled call (PyTorch rows: -).",
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
      "| vs optax amsgrad | state MB | temporaries MB | state + temporaries MB | GB accessed |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in part["rows"]:
      of_peak = "unknown" if r["of_peak"] is None else f"{100 * r['of_peak']:.0f}%"
      lines.append(
        f"| {r['optimizer']} | {r['median_ms']:.3f} | {r['iqr_ms'][0]:.3f}-{r['iqr_ms'][1]:.3f} "
        f"| {r['moved_bytes'] / 1e6:.1f} | {r['gb_per_s']:.1f} | {of_peak} "
        f"| {_ratio(r['vs_floor'])} | {_ratio(r['vs_amsgrad'])} | {_memory_cells(r)} |"
      )
  return "\n".join(lines) + "\n"


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


def gpu_short_markdown(kit: Kit, parts: Sequence[dict[str, Any]]) -> str:
  """The training comparison: each run's epochs, then the protocol's table and figure."""
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
  lines += ["", table(protocol, 1, kit.out)]
  figure = kit.out / protocol.name / "figure2_curves.png"
  if figure.is_file():
    lines += [f"![{protocol.name} curves]({protocol.name}/figure2_curves.png)", ""]
  return "\n".join(lines)


def not_done(step: str, record: dict[str, Any]) -> list[str]:
  """``- STEP: PART: STATUS: REASON`` per part of the record that is not done."""
  return [
    f"- {step}: {p.get('tree') or p.get('label')}: {p['status']}: {p['reason']}"
    for p in record.get("parts", [])
    if p["status"] != "done"
  ]


def write_summary(kit: Kit) -> None:
  """Rewrites ``DIR/summary.md`` from the step records in the folder."""
  device = kit.device
  peak = device["peak_bandwidth"]
  records = kit.records()
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
    f"{time.monotonic() - kit.start:.0f} s so far; written {now()}",
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
    missing += not_done(step, record)
  if missing:
    lines += ["", "Not done:", "", *missing]
  for step in STEPS:
    if step in records and kit.path(step, ".md").is_file():
      lines += ["", kit.path(step, ".md").read_text().rstrip()]
  tmp = kit.out / "summary.md.tmp"
  tmp.write_text("\n".join(lines) + "\n")
  os.replace(tmp, kit.out / "summary.md")
