"""The committed pod plans: the trainers' steps compiled for TPU slices (``benchmarks.pod_plan``),
one plan per configuration, and their table ``benchmarks/results/pods.md``.

    python -m benchmarks.pods                 # the plans not made yet, then the table
    python -m benchmarks.pods --report-only   # the table from the plans made
    python -m benchmarks.pods --set step-memory   # the whole step on one device (see below)

Each plan runs as its own ``python -m benchmarks.pod_plan ... --json`` process (a compile that runs
out of host memory or time loses only itself) and is kept as ``benchmarks/results/pods/NAME.json``
and ``NAME.txt`` (what the command printed) as soon as it ends; a plan already kept is not made
again, so an interrupted run resumes where it stopped. Needs ``libtpu``
(``pip install -e ".[tpu-plan]"``).

The configurations: ResNet-18 on CIFAR-10 at the paper's batch of 128 on one v5e and one v5p host
(4 chips, the batch split over them) with Padam's state in float32, bfloat16 and 8 bits; decoder
transformers of 93M to 1.23B parameters (``examples.ptb.transformer``) at a global batch of 256
sequences of 1,024 tokens on a v5e pod (16x16, 256 chips) and a v5p slice (4x4x4, 64 chips), fully
sharded over all chips (``--mesh fsdp=N``), with PadamW's state in float32, bfloat16 and 8 bits and
with optax's AdamW.

``--set step-memory``: the whole train step of ResNet-18 (batch 128) and of the PTB trainer's
largest LSTM (``lstm3``, its default batch) on one v5e chip and on this machine's CPU, with the
optimizer state in float32, bfloat16 and 8 bits (``benchmarks/results/step_memory.md``): what the
compact states save at the step's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

RESULTS = pathlib.Path("benchmarks/results")
PLANS_DIR = RESULTS / "pods"
TABLE = RESULTS / "pods.md"
TIMEOUT = 3600  # seconds per plan

RESNET = {"topologies": ("v5e:2x2", "v5p:2x2x1"), "state_bits": (32, 16, 8)}
DECODERS = (
  "transformer-12x768",
  "transformer-24x1024",
  "transformer-24x1536",
  "transformer-24x2048",
)
POD_SLICES = {"v5e:16x16": 256, "v5p:4x4x4": 64}
# (optimizer, state bits) of the decoder rows.
DECODER_OPTIMIZERS = (("padamw", 32), ("padamw", 16), ("padamw", 8), ("adamw", 32))


def step_memory_plans() -> dict[str, tuple[str, str, list[str]]]:
  """The whole train step on one device, its optimizer state in float32, bfloat16 and 8 bits:
  ResNet-18 at batch 128 and the PTB trainer's largest LSTM (``lstm3``) at its default batch, on
  one v5e chip and on this machine's CPU (``benchmarks/results/step_memory.md``)."""
  made: dict[str, tuple[str, str, list[str]]] = {}
  for topology in ("v5e:2x2", "cpu"):
    where = "v5e-1" if topology != "cpu" else "cpu-1"
    for trainer, model in (("cifar10", "resnet18"), ("ptb", "lstm3")):
      for bits in RESNET["state_bits"]:
        flags = ["--model", model, "--devices", "1", "--state-bits", str(bits)]
        made[f"step-{model}-{where}-{bits}"] = (topology, trainer, flags)
  return made


def plans() -> dict[str, tuple[str, str, list[str]]]:
  """Every configuration: name -> (topology, trainer, the trainer's flags)."""
  made: dict[str, tuple[str, str, list[str]]] = {}
  for topology in RESNET["topologies"]:
    for bits in RESNET["state_bits"]:
      flags = ["--model", "resnet18", "--batch-size", "128", "--state-bits", str(bits)]
      made[f"resnet18-{topology.replace(':', '-')}-padam-{bits}"] = (topology, "cifar10", flags)
  for topology, chips in POD_SLICES.items():
    for model in DECODERS:
      for optimizer, bits in DECODER_OPTIMIZERS:
        flags = ["--model", model, "--batch-size", "256", "--mesh", f"fsdp={chips}"]
        flags += ["--optimizer", optimizer, "--state-bits", str(bits)]
        name = f"{model.removeprefix('transformer-')}-{topology.replace(':', '-')}"
        made[f"{name}-{optimizer}-{bits}"] = (topology, "ptb", flags)
  return made


def command(topology: str, trainer: str, flags: Sequence[str]) -> list[str]:
  """The planner's command line of one configuration (as the table shows it)."""
  return ["python -m benchmarks.pod_plan", "--topology", topology, trainer, *flags]


def make(
  folder: pathlib.Path,
  name: str,
  topology: str,
  trainer: str,
  flags: list[str],
  timeout: float = TIMEOUT,
) -> None:
  """Runs one plan and keeps its JSON and its printed text in ``folder`` (when it ends); a plan
  not made within ``timeout`` seconds is kept as such."""
  folder.mkdir(parents=True, exist_ok=True)
  partial = folder / f"{name}.json.partial"
  args = [sys.executable, "-m", "benchmarks.pod_plan", "--topology", topology]
  args += ["--json", str(partial), trainer, *flags]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  start = time.perf_counter()
  try:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    # Kept, so that a run goes on with the others: the table says so (delete the file to retry).
    print(f"{name}: no plan within {timeout:.0f} s", file=sys.stderr)
    partial.unlink(missing_ok=True)
    record = {"fits": None, "reason": f"not compiled within {timeout:.0f} s here"}
    record |= {"name": name, "command": command(topology, trainer, flags), "seconds": timeout}
    (folder / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return
  seconds = time.perf_counter() - start
  if done.returncode in (130, -signal.SIGINT):  # Ctrl-C reached the plan too
    partial.unlink(missing_ok=True)
    raise KeyboardInterrupt
  if done.returncode not in (0, 3) or not partial.exists():
    tail = (done.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
    print(f"{name}: the planner failed (status {done.returncode}): {tail}", file=sys.stderr)
    partial.unlink(missing_ok=True)
    return
  record = json.loads(partial.read_text())
  record |= {"name": name, "command": command(topology, trainer, flags), "seconds": seconds}
  (folder / f"{name}.txt").write_text(done.stdout or done.stderr)
  (folder / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
  partial.unlink()
  fits = "fits" if record["fits"] else "does not fit"
  print(f"{name}: {fits} ({seconds:.0f} s)", flush=True)


def load(folder: pathlib.Path) -> dict[str, dict[str, Any]]:
  """The plans kept in ``folder`` so far, by name."""
  return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def _mb(n: float) -> str:
  return f"{n / 1e6:,.1f}"


def _roof(record: dict[str, Any]) -> str:
  estimate = record["roofline"]["estimate"]
  return "-" if estimate is None else f"{estimate * 1e3:,.1f}"


def _collective_mb(record: dict[str, Any]) -> str:
  moved = sum(c["bytes"] for c in record["collectives"].values())
  return _mb(moved)


def _scatters(record: dict[str, Any]) -> str:
  """How many reduce-scatters the step has, where its state is split (``-``: not split)."""
  if record["mesh"].get("fsdp", 1) == 1:
    return "-"
  return str(record["collectives"]["reduce-scatter"]["count"])


def _row(record: dict[str, Any], first: list[str]) -> str:
  if "peak" not in record:  # XLA refused to compile it, or the compile took too long here
    verdict = "no plan" if record["fits"] is None else "does not fit"
    return "| " + " | ".join(first) + f" | {verdict}: {record['reason']} |" + " |" * 8
  cells = [
    _mb(record["params"]),
    _mb(record["optimizer_state"]),
    _mb(record["temporaries"]),
    f"{_mb(record['peak'])} ({record['peak'] / record['memory']:.0%}"
    + ("" if record["fits"] else ": does not fit")
    + ")",
    f"{record['flops'] / 1e12:,.2f}",
    f"{record['bytes_accessed'] / 1e9:,.1f}",
    _collective_mb(record),
    _scatters(record),
    _roof(record),
  ]
  return "| " + " | ".join(first + cells) + " |"


COLUMNS = (
  "parameters MB | state MB | temporaries MB | peak MB (of the chip) | TFLOP | GB accessed | "
  "collectives MB | reduce-scatters | roofline ms |"
)


def _state_form(bits: int) -> str:
  return {32: "float32", 16: "bfloat16", 8: "8-bit"}[bits]


def report(records: dict[str, dict[str, Any]]) -> str:
  """The table of the plans kept (a configuration without a plan is left out and counted)."""
  configured = plans()
  lines = ["# TPU pod plans: the trainers' steps compiled for TPU slices, per chip", ""]
  any_record = next(iter(records.values()), {})
  lines += [
    f"Made by `python -m benchmarks.pods` ({len(records)} of {len(configured)} configurations): "
    "each is one `python -m benchmarks.pod_plan` command (below), compiled here for chips that "
    "are not attached, on "
    f"{any_record.get('machine', '?')}, JAX {any_record.get('jax', '?')}, libtpu "
    f"{any_record.get('libtpu', '?')}. Nothing ran on a TPU: memory and collectives are XLA's "
    "analyses of the compiled program, flops and bytes its cost model, and the roofline the "
    "larger of flops / peak flop/s and bytes / HBM bandwidth of the chip's published figures: a "
    "lower bound on the step's time. MB = 10^6 bytes; per chip and step.",
    "",
  ]
  lines += ["## ResNet-18, CIFAR-10, batch 128 (the paper's), Padam p = 1/8", ""]
  lines += ["| slice | state | " + COLUMNS, "|---|---|" + "---:|" * 9]
  for name, (topology, trainer, flags) in configured.items():
    if trainer == "cifar10" and name in records:
      bits = int(flags[flags.index("--state-bits") + 1])
      lines.append(_row(records[name], [topology, _state_form(bits)]))
  lines += [
    "",
    "## Decoder transformers, global batch 256 x 1,024 tokens, fully sharded (fsdp = all chips)",
    "",
  ]
  lines += ["| slice | model | optimizer, state | " + COLUMNS, "|---|---|---|" + "---:|" * 9]
  for name, (topology, trainer, flags) in configured.items():
    if trainer == "ptb" and name in records:
      model = flags[flags.index("--model") + 1].removeprefix("transformer-")
      optimizer = flags[flags.index("--optimizer") + 1]
      bits = int(flags[flags.index("--state-bits") + 1])
      params = records[name].get("num_params")
      label = f"{model} ({params / 1e6:,.0f}M)" if params else model
      row = [topology, label, f"{optimizer}, {_state_form(bits)}"]
      lines.append(_row(records[name], row))
  lines += ["", *largest_fitting(records), "", "## Commands", ""]
  lines += [f"- `{name}`: `{' '.join(records[name]['command'])}`" for name in records]
  return "\n".join(lines) + "\n"


def largest_fitting(records: dict[str, dict[str, Any]]) -> list[str]:
  """Per slice and optimizer: the largest decoder whose step fits a chip, and the next one's peak."""
  lines = [
    "### The largest decoder that fits",
    "",
    "| slice | optimizer, state | largest that fits | its peak per chip | next size |",
    "|---|---|---|---:|---|",
  ]
  for topology, chips in POD_SLICES.items():
    for optimizer, bits in DECODER_OPTIMIZERS:
      fitting, beyond = None, "none larger planned"
      for model in DECODERS:
        short = model.removeprefix("transformer-")
        name = f"{short}-{topology.replace(':', '-')}"
        record = records.get(f"{name}-{optimizer}-{bits}")
        if record is None:
          beyond = "not planned yet"
          break
        if record["fits"] is None:
          beyond = f"{short}: no plan ({record['reason']})"
          break
        if not record["fits"]:
          peak = record.get("peak")
          beyond = f"{short}: " + (
            f"peak {peak / 1e6:,.0f} MB ({peak / record['memory']:.0%})"
            if peak
            else "refused by XLA"
          )
          break
        fitting = (short, record)
      if fitting is None:
        cells = ["none", "-"]
      else:
        label, record = fitting
        params = record["num_params"] / 1e6
        cells = [
          f"{label} ({params:,.0f}M)",
          f"{record['peak'] / 1e6:,.0f} MB ({record['peak'] / record['memory']:.0%})",
        ]
      lines.append(
        f"| {topology} ({chips} chips) | {optimizer}, {_state_form(bits)} | "
        + " | ".join(cells)
        + f" | {beyond} |"
      )
  return lines


def step_memory_report(records: dict[str, dict[str, Any]]) -> str:
  """The whole-step table: per device, and what the compact states save at rest and at the peak."""
  configured = step_memory_plans()
  any_record = next(iter(records.values()), {})
  lines = [
    "# The whole train step's memory on one device, by the optimizer state's form",
    "",
    f"Made by `python -m benchmarks.pods --set step-memory` ({len(records)} of "
    f"{len(configured)} configurations) on {any_record.get('machine', '?')}, JAX "
    f"{any_record.get('jax', '?')}, libtpu {any_record.get('libtpu', '?')}: each row is one "
    "`python -m benchmarks.pod_plan` command (below), the trainer's own jitted step (gradient "
    "and update, state donated) compiled for one v5e chip (deviceless) or for this machine's CPU. "
    "Padam p = 1/8; MB = 10^6 bytes. Saved: against the float32 state's row, the state's bytes "
    "at rest and the step's peak.",
    "",
    "| model | compiled for | state | parameters MB | state MB | temporaries MB | peak MB | "
    "GB accessed | saved at rest MB | saved at the peak MB |",
    "|---|---|---|" + "---:|" * 7,
  ]
  for name, (topology, _, flags) in configured.items():
    record = records.get(name)
    if record is None or "peak" not in record:
      continue
    bits = int(flags[flags.index("--state-bits") + 1])
    base = records.get(name.rsplit("-", 1)[0] + "-32")
    saved = ["", ""]
    if base and bits != 32:
      saved = [
        _mb(base["optimizer_state"] - record["optimizer_state"]),
        _mb(base["peak"] - record["peak"]),
      ]
    where = "XLA:CPU" if topology == "cpu" else "XLA:TPU, one v5e chip"
    lines.append(
      "| "
      + " | ".join(
        [
          flags[flags.index("--model") + 1],
          where,
          _state_form(bits),
          _mb(record["params"]),
          _mb(record["optimizer_state"]),
          _mb(record["temporaries"]),
          _mb(record["peak"]),
          f"{record['bytes_accessed'] / 1e9:,.2f}",
          *saved,
        ]
      )
      + " |"
    )
  lines += ["", "## Commands", ""]
  lines += [f"- `{name}`: `{' '.join(records[name]['command'])}`" for name in records]
  return "\n".join(lines) + "\n"


# A set of plans: its configurations, its folder, its table and the table's writer.
SETS = {
  "pods": (plans, PLANS_DIR, TABLE, report),
  "step-memory": (
    step_memory_plans,
    RESULTS / "step_memory",
    RESULTS / "step_memory.md",
    step_memory_report,
  ),
}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--set", choices=sorted(SETS), default="pods", help="which plans")
  parser.add_argument("--report-only", action="store_true", help="only write the table")
  parser.add_argument("--only", nargs="+", metavar="NAME", help="make only these plans")
  parser.add_argument(
    "--timeout",
    type=float,
    default=TIMEOUT,
    metavar="S",
    help=f"seconds a plan may take; one that takes longer is kept as not made (default {TIMEOUT})",
  )
  args = parser.parse_args(argv)
  configurations, folder, table, write = SETS[args.set]
  configured = configurations()
  unknown = sorted(set(args.only or ()) - set(configured))
  if unknown:
    parser.error(f"unknown plan(s) {', '.join(unknown)}; known: {', '.join(configured)}")
  if not args.report_only:
    try:
      for name, (topology, trainer, flags) in configured.items():
        kept = (folder / f"{name}.json").exists()  # by this run, an earlier one or another
        if not kept and (not args.only or name in args.only):
          make(folder, name, topology, trainer, flags, args.timeout)
          table.write_text(write(load(folder)))
    except KeyboardInterrupt:
      table.write_text(write(load(folder)))
      print(
        f"interrupted; the plans made are kept in {folder} (run again to go on)", file=sys.stderr
      )
      return 130
  table.write_text(write(load(folder)))
  print(f"wrote {table}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
