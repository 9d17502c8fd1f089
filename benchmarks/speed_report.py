"""The update-step speed tables: times and ratios, the compiled step's counts, the targets.

:func:`render` writes the full table of ``python -m benchmarks.update_speed`` (the denominator
forms, then per tree the times, the compiled HLO's counts from :mod:`benchmarks.hlo_counts` and
the targets of :func:`targets`); :func:`render_rows` the short table of the rows chosen with
``--rows``.
"""

from __future__ import annotations

import statistics

from benchmarks.hlo_counts import OPS, hlo_summary
from benchmarks.param_trees import tree_bytes
from benchmarks.step_timing import WEIGHT_DECAY, Bench, Row


def fmt_ratio(x: float | None) -> str:
  """``1.23x``, or ``-`` for no ratio."""
  return "-" if x is None else f"{x:.2f}x"


def hlo_table(bench: Bench, rows: list[Row], param_bytes: int) -> list[str]:
  """The markdown lines of the compiled steps' counts (:func:`benchmarks.hlo_counts.hlo_summary`)
  for the rows that have their HLO: a column per kind of operation found in any of them."""
  summaries = [(r, hlo_summary(r.hlo)) for r in rows if r.hlo]
  kinds = [k for k in OPS if any(k in s.instructions for _, s in summaries)]
  lines = [
    "Compiled HLO of each JAX step (XLA:CPU), the one timed: kernels launched, bytes they read "
    "and write (x the parameter bytes), and per kind of elementwise transcendental operation "
    "(and division) found, the elements it computes per parameter and, in parentheses, its "
    "instructions in the step, scalar ones included (a bias correction's, for instance).",
    "",
    "| " + " | ".join(["optimizer", "weight decay", "kernels", "read", "written", *kinds]) + " |",
    "|---|---|---|---|---|" + "---|" * len(kinds),
  ]
  for r, s in summaries:
    counts = [
      f"{s.elements.get(k, 0) / bench.size:.2f} ({s.instructions.get(k, 0)})" for k in kinds
    ]
    cells = [
      r.name,
      f"{r.weight_decay:g}",
      str(s.kernels),
      f"{s.read / param_bytes:.2f}x",
      f"{s.written / param_bytes:.2f}x",
      *counts,
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def render(
  benches: list[tuple[Bench, list[Row]]],
  header: dict[str, str],
  targets_for,
  forms: list[tuple[str, float]],
) -> str:
  """The full table: the denominator forms, then per tree the times, the compiled steps' counts
  (:func:`hlo_table`) and the lines of ``targets_for(bench, rows, medians, floor, param_bytes)``."""
  out = ["# Optimizer update-step speed", ""]
  out += [f"- {k}: {v}" for k, v in header.items()]
  out += [
    "",
    "## Arithmetic of the denominator forms",
    "",
    "Nanoseconds per element on one core, the array in cache (a jitted loop over 16,384 "
    "elements, best of repeats, loop overhead subtracted): the compute each form adds to a "
    "step when memory bandwidth does not hide it.",
    "",
    "| form | ns / element |",
    "|---|---|",
    *[f"| {name} | {ns:.2f} |" for name, ns in forms],
    "",
  ]
  for bench, rows in benches:
    med = {(r.name, r.weight_decay): statistics.median(r.times) for r in rows}
    floor = med[("floor (adds only)", 0.0)]
    param_bytes = tree_bytes(bench.params)
    out += [
      f"## {bench.name}: {bench.size:,} parameters in {len(bench.shapes)} arrays "
      f"({param_bytes / 1e6:.1f} MB float32)",
      "",
      "| optimizer | weight decay | median ms | IQR ms | vs optax amsgrad | vs floor "
      "| state MB | state / params |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
      base_name = "optax amsgrad" if r.weight_decay == 0 else "optax amsgrad + L2"
      base = med[(base_name, r.weight_decay)]
      q = _quartiles(r.times)
      state = "-" if r.kind == "floor" else f"{r.state_bytes / 1e6:.1f}"
      ratio = "-" if r.kind == "floor" else f"{r.state_bytes / param_bytes:.3f}"
      out.append(
        f"| {r.name} | {r.weight_decay:g} | {med[(r.name, r.weight_decay)] * 1e3:.1f} "
        f"| {q[0] * 1e3:.1f}-{q[2] * 1e3:.1f} | {fmt_ratio(med[(r.name, r.weight_decay)] / base)} "
        f"| {fmt_ratio(med[(r.name, r.weight_decay)] / floor)} | {state} | {ratio} |"
      )
    floor_row = next(r for r in rows if r.kind == "floor")
    moved = 9 * param_bytes  # reads g, x, m, v, vhat; writes x, m, v, vhat
    out += [
      "",
      f"The floor moves {moved / 1e6:.0f} MB (5 arrays read, 4 written) in {floor * 1e3:.1f} ms: "
      f"{moved / floor / 1e9:.1f} GB/s. Ratios use medians of {len(floor_row.times)} timed "
      "steps per row; weight-decay rows are compared with `optax amsgrad + L2` "
      "(`add_decayed_weights` chained before `amsgrad`, the same coupled decay).",
      "",
    ]
    out += hlo_table(bench, rows, param_bytes)
    out += ["", "Targets:", ""]
    out += [f"- {line}" for line in targets_for(bench, rows, med, floor, param_bytes)]
    out.append("")
  return "\n".join(out)


def render_rows(benches: list[tuple[Bench, list[Row]]], header: dict[str, str]) -> str:
  """The table of the rows chosen with ``--rows``: times, ratios and the step's scratch memory."""
  out = ["# Optimizer update-step speed: chosen rows", ""]
  out += [f"- {k}: {v}" for k, v in header.items()]
  for bench, rows in benches:
    med = {r.name: statistics.median(r.times) for r in rows}
    first = rows[0].name
    base = "optax amsgrad" if "optax amsgrad" in med else first
    param_bytes = tree_bytes(bench.params)
    out += [
      "",
      f"## {bench.name}: {bench.size:,} parameters in {len(bench.shapes)} arrays "
      f"({param_bytes / 1e6:.1f} MB float32)",
      "",
      f"| optimizer | weight decay | median ms | IQR ms | vs {first} | vs {base} | scratch MB |",
      "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
      q = _quartiles(r.times)
      out.append(
        f"| {r.name} | {r.weight_decay:g} | {med[r.name] * 1e3:.1f} "
        f"| {q[0] * 1e3:.1f}-{q[2] * 1e3:.1f} | {med[r.name] / med[first]:.2f}x "
        f"| {med[r.name] / med[base]:.2f}x | {r.temp_bytes / 1e6:.1f} |"
      )
    out += [
      "",
      f"Medians of {len(rows[0].times)} timed steps per row. Scratch: the compiled "
      "step's temporary buffers (XLA's memory analysis), allocated at every call.",
    ]
    if "padam p=1/8" in med and "padam p traced" in med:
      ratio = med["padam p traced"] / med["padam p=1/8"]
      out += [
        "",
        f"- padam p traced vs padam p=1/8: {ratio:.2f}x (target <= 1.05x): "
        f"{'met' if ratio <= 1.05 else 'MISSED'}",
      ]
  out.append("")
  return "\n".join(out)


def targets(bench: Bench, rows: list[Row], med, floor: float, param_bytes: int) -> list[str]:
  del bench
  padam, traced = med[("padam p=1/8", 0.0)], med[("padam p traced", 0.0)]
  amsgrad = med[("optax amsgrad", 0.0)]

  def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"

  lines = [
    f"padam p=1/8 vs optax amsgrad: {padam / amsgrad:.2f}x (target <= 1.0x): "
    f"{verdict(padam / amsgrad <= 1.0)}",
    f"padam p=1/8 vs floor: {padam / floor:.2f}x (target <= 1.15x): "
    f"{verdict(padam / floor <= 1.15)}",
    f"padam p=1/8 with weight decay vs optax amsgrad + L2: "
    f"{med[('padam p=1/8', WEIGHT_DECAY)] / med[('optax amsgrad + L2', WEIGHT_DECAY)]:.2f}x",
    f"padam p traced vs optax amsgrad: {traced / amsgrad:.2f}x (target <= 1.6x): "
    f"{verdict(traced / amsgrad <= 1.6)}",
  ]
  for decay in (0.0, WEIGHT_DECAY):
    key = ("torch Padam (reference rule)", decay)
    if key in med:
      speedup = med[key] / med[("padam p=1/8", decay)]
      lines.append(
        f"reference-rule torch Padam / padam p=1/8 (weight decay {decay:g}): {speedup:.2f}x "
        f"faster (target >= 3x): {verdict(speedup >= 3)}"
      )
  for r in rows:
    if r.name.startswith("padam") and r.kind == "jax":
      lines.append(
        f"state of {r.name} (weight decay {r.weight_decay:g}): {r.state_arrays:g} arrays per "
        f"parameter, {r.state_bytes:,} bytes = {r.state_bytes / param_bytes:.4f} x the "
        "parameters' bytes (the excess is the step count and injected scalars)"
      )
  return lines


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown"


def _quartiles(times: list[float]) -> list[float]:
  """The three quartiles of ``times``; one time is its own quartiles (a run of one round)."""
  return statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
