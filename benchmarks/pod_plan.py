"""Plan a TPU pod run without a TPU: a trainer's own train step, compiled for a TPU topology.

    python -m benchmarks.pod_plan --topology v5e:2x2 cifar10 --model resnet18 --batch-size 128 \\
        --state-bits 8
    python -m benchmarks.pod_plan --topology v5p:4x4x4 ptb --model transformer-24x1024 \\
        --batch-size 256 --mesh fsdp=64

After ``--topology`` and the trainer (``cifar10`` or ``ptb``) come that trainer's own flags
(``python -m examples.cifar10 --help``): model, batch size, optimizer, ``--state-bits``, ``--dtype``,
``--mesh``, ``--steps-per-call``, ``--hparam``. The plan builds what the trainer builds - the task,
the registry's optimizer, the model and optimizer state laid out by the trainers' mesh rule
(:func:`examples.training.fsdp_spec`), the jitted, donating train step (:mod:`examples.training.steps`)
- from abstract arrays (nothing is allocated, and the data are zeros of the real files' shapes), and
compiles that step for the chips of the topology (``jax.experimental.topologies``; needs ``libtpu``:
``pip install -e ".[tpu-plan]"``). It prints, per device: parameters, optimizer state, the step's
temporaries and its peak against the chip's memory (XLA's ``memory_analysis()``), flops and bytes
(``cost_analysis()``), the collectives of the compiled program and a roofline estimate of the step's
time; the sharding checks; the hosts of the topology and the command each one runs.

What it does not show: how fast a step runs (nothing runs; the roofline is a lower bound from the
chip's published peaks), nor whether the program that runs on a real pod is the same (another
``libtpu`` may compile another one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import update_memory
from benchmarks.speed_report import cpu_model
from examples import cli
from examples.training import devices, settings, steps

# Per chip, from Google Cloud's TPU pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p-training):
# HBM bytes, peak bf16 flop/s, HBM bytes/s, bidirectional ICI bytes/s (None: not published there).
CHIPS: dict[str, dict[str, float | None]] = {
  "TPU v4": {"hbm": 32 * 2**30, "flops": 275e12, "hbm_bandwidth": 1200e9, "ici_bandwidth": None},
  "TPU v5 lite": {
    "hbm": 16 * 2**30,
    "flops": 197e12,
    "hbm_bandwidth": 819e9,
    "ici_bandwidth": 400e9,
  },
  "TPU v5": {"hbm": 95 * 2**30, "flops": 459e12, "hbm_bandwidth": 2765e9, "ici_bandwidth": 1200e9},
}
CHIP_NAMES = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p"}
# Sizes of the real data files (the plan's data are zeros of these shapes).
CIFAR10_IMAGES = {"train": 50_000, "test": 10_000}
PTB_TOKENS = {"train": 929_589, "valid": 73_760, "test": 82_430}
PTB_VOCAB = 10_000
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Flags of a run that a plan has no use for (nothing is written or resumed).
PLAN_OMITS = ("workdir", "resume", "overwrite", "progress", "data_dir", "stop_after_epoch")
MB = 1e6


class PlanError(ValueError):
  """A plan that cannot be made (no libtpu, an unknown topology, a batch that does not split)."""


def topology_devices(topology: str) -> list[Any]:
  """The devices of a TPU topology such as ``v5e:2x2`` or ``v5p:4x4x4``, without a TPU; ``cpu``:
  this machine's CPU devices (XLA:CPU's program, for comparison)."""
  if topology == "cpu":
    return jax.devices("cpu")
  try:
    chips = update_memory.target_devices(topology)  # no TPU opened: libtpu's lock is not taken
  except (ImportError, RuntimeError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise PlanError(
      f"--topology {topology}: cannot describe it ({first}); a TPU topology needs libtpu "
      '(pip install -e ".[tpu-plan]") and a name such as v5e:2x2, v5p:2x2x1 or v4:2x2x1'
    ) from e
  # JAX runs a v4 chip's two TensorCores as one device ("megacore"); the topology lists both.
  return [d for d in chips if getattr(d, "core_on_chip", 0) == 0]


def _cifar10_task(config: Any) -> Any:
  from examples.cifar10 import input_pipeline, train

  def split(n: int) -> Any:
    return input_pipeline.Split(np.zeros((n, 32, 32, 3), np.uint8), np.zeros((n,), np.int32))

  val = split(config.val_size) if config.val_size else None
  train_n = config.train_size or CIFAR10_IMAGES["train"]
  return train.Cifar10Task(
    config, split(train_n), split(config.test_size or CIFAR10_IMAGES["test"]), val
  )


def _ptb_task(config: Any) -> Any:
  from examples.ptb import input_pipeline, train

  spec = train.models.get_spec(config.model, tie_weights=config.tie_weights)
  train.check_window(spec, config.bptt)
  sizes = dict(PTB_TOKENS)
  if config.train_tokens is not None:
    sizes["train"] = min(sizes["train"], config.train_tokens)
  corpus = input_pipeline.Corpus(
    vocab=tuple(f"w{i}" for i in range(PTB_VOCAB)),
    **{name: np.zeros((n,), np.int32) for name, n in sizes.items()},
  )
  return train.make_task(config, corpus)


def _trainer(name: str) -> tuple[type, Any]:
  """The config class and the task maker of trainer ``name``."""
  if name == "cifar10":
    from examples.cifar10 import train

    return train.Config, _cifar10_task
  from examples.ptb import train

  return train.Config, _ptb_task


def _placed(tree: Any, sharding: Any) -> Any:
  """``tree``'s arrays as ``jax.ShapeDtypeStruct`` placed with ``sharding`` (one for all)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


_HEADER = re.compile(r"^(?:ENTRY )?%(?P<name>[\w.-]+) \((?P<params>.*)\) -> .* \{$")
_INSTRUCTION = re.compile(r"=\s*(?P<result>.+?)\s+(?P<op>[a-z][a-z-]*)\((?P<operands>[^)]*)\)")
_CALLS = re.compile(r"calls=%(?P<name>[\w.-]+)")
_SHAPE = re.compile(r"\b(?P<dtype>pred|[subf]\d+|bf16|f8\w*)\[(?P<dims>[\d,]*)\]")
# XLA:TPU writes a reduce-scatter as a fusion that calls a computation of this name (holding an
# all-reduce of the whole buffer).
_REDUCE_SCATTER = "all-reduce-scatter"


def _shape_bytes(text: str, largest: bool = False) -> int:
  """Bytes of the arrays whose shapes ``text`` names (with ``largest``, of the largest one: the
  result of an asynchronous all-gather or collective-permute start holds its operand, its output
  and context words)."""
  sizes = []
  for m in _SHAPE.finditer(text):
    dtype = m["dtype"]
    bits = 8 if dtype == "pred" or dtype.startswith("f8") else int(re.sub(r"\D", "", dtype))
    dims = [int(d) for d in m["dims"].split(",") if d]
    sizes.append(math.prod(dims) * bits // 8)
  return max(sizes, default=0) if largest else sum(sizes)


def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """Count and bytes of each kind of collective in a compiled program's text.

  An asynchronous pair (``all-gather-start`` ... ``-done``) counts once; so does XLA:TPU's
  reduce-scatter (a fusion calling an ``all-reduce-scatter`` computation), whose inner all-reduce
  is not counted again. The bytes of one are the larger of its operands and its results: the whole
  buffer it gathers, scatters or reduces. A collective inside a loop's body counts once.
  """
  found = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
  inputs: dict[str, int] = {}  # a computation's parameters' bytes
  inside = ""
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header:
      inside = header["name"]
      inputs[inside] = _shape_bytes(header["params"])
      continue
    m = _INSTRUCTION.search(line)
    if m is None or inside.startswith(_REDUCE_SCATTER):
      continue
    start = m["op"] in ("all-gather-start", "collective-permute-start")
    op = m["op"].removesuffix("-start")
    called = _CALLS.search(line)
    if op == "fusion" and called and called["name"].startswith(_REDUCE_SCATTER):
      op = "reduce-scatter"
      moved = inputs.get(called["name"], 0)
    elif op in found:
      moved = 0
    else:
      continue
    found[op]["count"] += 1
    result = _shape_bytes(m["result"], largest=start)
    found[op]["bytes"] += max(moved, result, _shape_bytes(m["operands"]))
  return found


def _sharding_checks(state: Any, compiled: Any, mesh: Any) -> dict[str, Any]:
  """Whether the compiled step keeps every state array where the trainers' rule puts it."""
  fsdp = mesh.shape[devices.FSDP_AXIS]
  rule = [devices.fsdp_spec(x.shape, fsdp) for x in jax.tree.leaves(state)]
  (state_in, *_), _ = compiled.input_shardings
  state_out = compiled.output_shardings[0]
  leaves = jax.tree.leaves(state)
  mismatched = []
  for where, shardings in (("input", state_in), ("output", state_out)):
    got = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    for x, want, have in zip(leaves, rule, got, strict=True):
      if not have.is_equivalent_to(jax.sharding.NamedSharding(mesh, want), len(x.shape)):
        mismatched.append(f"{where} {x.shape} {x.dtype}: {have} (rule: {want})")
  return {
    "state_arrays": len(leaves),
    "split_over_fsdp": sum(1 for spec in rule if devices.FSDP_AXIS in spec),
    "mismatched": mismatched,
  }


@dataclasses.dataclass(frozen=True)
class Plan:
  """What one compile of a trainer's step says, per device (bytes, flops, seconds)."""

  topology: str
  chip: str
  devices: int
  hosts: int
  mesh: dict[str, int]
  num_params: int
  params: int
  optimizer_state: int
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  peak: int
  memory: float
  flops: float
  bytes_accessed: float
  collectives: dict[str, dict[str, int]]
  checks: dict[str, Any]
  compile_seconds: float
  command: list[str]

  @property
  def fits(self) -> bool:
    """Whether the step's peak is within a chip's memory."""
    return not self.peak > self.memory

  def roofline(self) -> dict[str, float | None]:
    """Seconds per step from the chip's peaks: flops / peak flop/s, bytes / HBM bandwidth,
    collective bytes / ICI bandwidth (None where it is not published); the estimate is the larger
    of the first two (collectives assumed overlapped), a lower bound."""
    spec = CHIPS.get(self.chip)
    if spec is None:
      return {"compute": None, "memory": None, "collectives": None, "estimate": None}
    compute = self.flops / spec["flops"]
    memory = self.bytes_accessed / spec["hbm_bandwidth"]
    moved = sum(c["bytes"] for c in self.collectives.values())
    ici = spec["ici_bandwidth"]
    return {
      "compute": compute,
      "memory": memory,
      "collectives": None if ici is None else moved / ici,
      "estimate": max(compute, memory),
    }

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "roofline": self.roofline()}


class DoesNotFit(PlanError):
  """XLA:TPU refused the step: it needs more memory than a device has (its words say how much)."""


@dataclasses.dataclass(frozen=True)
class _Build:
  """A trainer's step lowered for a topology, and what the plan reports beside its analyses."""

  lowered: Any
  chips: list[Any]
  mesh: Any
  model: steps.Model
  state: Any
  command: list[str]


def _command(trainer: str, config: Any) -> list[str]:
  """The command every host of the pod runs for ``config``."""
  flags = cli.config_flags(config)
  return [f"python -m examples.{trainer}", *flags, "--data-dir", "DIR", "--distributed"]


def build(trainer: str, config: Any, topology: str, traced_p: bool = False) -> _Build:
  """Lowers ``trainer``'s train step with ``config`` for ``topology``'s chips from abstract
  arrays: the trainer's task (on zeros of its data's shapes), optimizer, state layout and step."""
  chips = topology_devices(topology)
  count = len(chips) if config.devices is None else config.devices
  mesh = devices.make_mesh(count, config.mesh, available=chips)
  if config.batch_size % count:
    raise PlanError(
      f"--batch-size {config.batch_size} is not valid; it must be a multiple of the {count} "
      f"devices of {topology}"
    )
  _, make_task = _trainer(trainer)
  task = make_task(config)
  command = _command(trainer, config)
  if traced_p:
    p = dict(config.hparams).get("p", 0.125)
    config = dataclasses.replace(
      config, hparams={**config.hparams, "p": optax.constant_schedule(p)}
    )
  setup = settings.make_optimizer(task, config)
  model, state = steps.abstract_state(task, setup.tx, jax.random.key(config.seed), mesh)
  jitted = steps.Steps(task, model, mesh)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=jitted.replicated)
  carry = _placed(task.init_carry(config.batch_size), jitted.batch_sharded)
  data = task.train_data()
  order = None
  if data is not None:
    data = _placed(data, jitted.replicated)
    order = _placed(jax.eval_shape(task.epoch_order, key), jitted.replicated)
    batch = jax.eval_shape(task.train_batch, data, order, jnp.int32(0))
  else:
    batch = _placed(next(iter(task.train_batches(1, jax.random.key(0)))), jitted.batch_sharded)
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=jitted.replicated)
  sums = dict.fromkeys(jitted.sum_names(state, carry, batch, key), scalar)
  lowered = jitted.lower(
    state,
    carry,
    sums,
    key,
    batch=batch,
    data=data,
    order=order,
    steps_per_call=config.steps_per_call or 1,
  )
  return _Build(lowered, chips[:count], mesh, model, state, command)


def _compile(lowered: Any) -> tuple[Any, float]:
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise DoesNotFit(str(e).strip().splitlines()[0]) from e
  return compiled, time.perf_counter() - start


def make_plan(trainer: str, config: Any, topology: str, traced_p: bool = False) -> Plan:
  """Compiles ``trainer``'s train step with ``config`` for ``topology``'s chips (see the module).

  Raises:
    PlanError: for a topology that cannot be described or a batch that does not split.
    DoesNotFit: when XLA refuses the step for want of device memory.
  """
  made = build(trainer, config, topology, traced_p)
  compiled, seconds = _compile(made.lowered)
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  # The bytes per device of the state as the compiled step takes it.
  state_in = compiled.input_shardings[0][0]
  params = nnx.filter_state(made.state[0], nnx.Param)
  chip = made.chips[0].device_kind  # one device per chip
  hbm = CHIPS.get(chip, {}).get("hbm")
  return Plan(
    topology=topology,
    chip=chip,
    devices=len(made.chips),
    hosts=len({d.process_index for d in made.chips}),
    mesh=dict(made.mesh.shape),
    num_params=made.model.num_params,
    params=update_memory.per_device_bytes(params, nnx.filter_state(state_in[0], nnx.Param)),
    optimizer_state=update_memory.per_device_bytes(made.state[1], state_in[1]),
    arguments=memory.argument_size_in_bytes,
    outputs=memory.output_size_in_bytes,
    aliased=memory.alias_size_in_bytes,
    temporaries=memory.temp_size_in_bytes,
    peak=update_memory.peak_bytes(memory),
    memory=float(hbm) if hbm else math.nan,
    flops=float(cost.get("flops", 0.0)),
    bytes_accessed=float(cost.get("bytes accessed", 0.0)),
    collectives=collectives(compiled.as_text()),
    checks=_sharding_checks(made.state, compiled, made.mesh),
    compile_seconds=seconds,
    command=made.command,
  )


def _mb(n: float) -> str:
  return f"{n / MB:,.1f} MB"


def _seconds(s: float | None) -> str:
  return "not published" if s is None else f"{s * 1e3:,.2f} ms"


def report(plan: Plan) -> str:
  """The plan as the text the command prints."""
  chip = CHIP_NAMES.get(plan.chip, plan.chip)
  lines = [
    f"{plan.topology}: {plan.devices} chips ({plan.chip}, one device each), "
    f"{plan.hosts} host(s); mesh {plan.mesh}; {plan.num_params:,} parameters; compiled in "
    f"{plan.compile_seconds:.1f} s",
    "",
    "per device (XLA's memory analysis of the compiled step):",
    f"  parameters          {_mb(plan.params)}",
    f"  optimizer state     {_mb(plan.optimizer_state)}",
    f"  arguments           {_mb(plan.arguments)} (state, data, carry; {_mb(plan.aliased)} donated)",
    f"  temporaries         {_mb(plan.temporaries)}",
    f"  peak                {_mb(plan.peak)}"
    + (
      f" of {_mb(plan.memory)} on a {chip} chip ({plan.peak / plan.memory:.1%})"
      if plan.memory == plan.memory  # not NaN: a TPU chip's memory is known
      else ""
    ),
    "",
    "per device and step (XLA's cost model):",
    f"  flops               {plan.flops:.3e}",
    f"  bytes accessed      {plan.bytes_accessed / 1e9:,.2f} GB",
    "  collectives         "
    + (
      ", ".join(
        f"{kind} x{c['count']} ({_mb(c['bytes'])})"
        for kind, c in plan.collectives.items()
        if c["count"]
      )
      or "none"
    ),
  ]
  roof = plan.roofline()
  if roof["estimate"] is not None:
    lines += [
      "",
      f"roofline from {chip}'s published peaks (a lower bound, nothing ran):",
      f"  compute {_seconds(roof['compute'])}, memory {_seconds(roof['memory'])}, collectives "
      f"{_seconds(roof['collectives'])}; step >= {_seconds(roof['estimate'])}",
    ]
  checks = plan.checks
  fsdp = plan.mesh.get(devices.FSDP_AXIS, 1)
  scatters = plan.collectives["reduce-scatter"]["count"]
  lines += [
    "",
    "sharding checks:",
    f"  state arrays split over fsdp as the rule says: {checks['split_over_fsdp']} of "
    f"{checks['state_arrays']} split, "
    + (
      "every array as the rule says"
      if not checks["mismatched"]
      else f"{len(checks['mismatched'])} NOT: " + "; ".join(checks["mismatched"][:5])
    ),
  ]
  if fsdp > 1:
    lines.append(
      f"  gradients reduced by reduce-scatter: {'yes' if scatters else 'NO'} ({scatters} in the step)"
    )
  lines += [
    "",
    f"launch: each of the {plan.hosts} host(s) runs the same command (JAX finds the others on a "
    "TPU VM; --data-dir and --workdir must name folders every host sees):",
    "  " + " ".join(plan.command),
  ]
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, str, Any]:
  """The plan's flags, the trainer's name and its config."""
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.pod_plan",
    description=__doc__.splitlines()[0],
    usage="python -m benchmarks.pod_plan --topology TOPOLOGY {cifar10,ptb} [the trainer's flags]",
    epilog="The trainer's flags are those of python -m examples.cifar10 --help or python -m "
    "examples.ptb --help (without --workdir, --resume and the launch flags). Exit status: 0 with "
    "a plan, 2 for a bad flag or topology, 3 when the step does not fit a chip.",
  )
  parser.add_argument(
    "--topology",
    required=True,
    help="a TPU topology, e.g. v5e:2x2, v5p:4x4x4; cpu: this machine's CPU devices",
  )
  parser.add_argument(
    "--traced-p", action="store_true", help="give Padam's p as a schedule (traced in the step)"
  )
  parser.add_argument("--json", metavar="FILE", help="also write the plan to FILE as JSON")
  parser.add_argument("trainer", choices=("cifar10", "ptb"))
  args, rest = parser.parse_known_args(argv)
  if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
    parser.error(f"--json {args.json}: its folder does not exist")
  config_type, _ = _trainer(args.trainer)
  flags = argparse.ArgumentParser(prog=f"python -m benchmarks.pod_plan ... {args.trainer}")
  cli.add_config_flags(flags, config_type, omit=PLAN_OMITS, launch_flags=False)
  config = cli.config_from_args(config_type, flags.parse_args(rest))
  return args, args.trainer, config


EXIT_DOES_NOT_FIT = 3
EXIT_INTERRUPTED = 130


def _versions() -> dict[str, str]:
  """The machine that compiled, and the compiler's versions."""
  from importlib import metadata

  try:
    libtpu = metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    libtpu = "not installed"
  return {
    "machine": f"{cpu_model()}, {os.cpu_count()} cores",
    "jax": jax.__version__,
    "libtpu": libtpu,
  }


def _write_json(path: str | None, record: dict[str, Any]) -> None:
  if path:
    with open(path, "w") as f:
      json.dump(record, f, indent=2)
      f.write("\n")


def _interrupted(signum: int, frame: Any) -> None:
  del signum, frame
  print("interrupted; no plan was written", file=sys.stderr, flush=True)
  os._exit(EXIT_INTERRUPTED)


def main(argv: Sequence[str] | None = None) -> int:
  """Exit status: 0 with a plan, 2 for bad flags or no libtpu, 3 when the step does not fit (XLA
  refuses it, or its peak is above a chip's memory)."""
  # The plan compiles for a TPU that is not here: the CPU is the only backend to start (with
  # libtpu installed, JAX would otherwise try to open a TPU, and take libtpu's lock).
  jax.config.update("jax_platforms", "cpu")
  # Ctrl-C during a compile: one line and status 130 (nothing is written before the plan is made).
  signal.signal(signal.SIGINT, _interrupted)
  try:
    args, trainer, config = parse_args(argv)
    plan = make_plan(trainer, config, args.topology, traced_p=args.traced_p)
  except DoesNotFit as e:
    print(f"does not fit: {e}", file=sys.stderr)
    _write_json(
      args.json, {"topology": args.topology, "fits": False, "reason": str(e), **_versions()}
    )
    return EXIT_DOES_NOT_FIT
  except ValueError as e:  # PlanError, and the trainer's own one-line errors
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report(plan))
  _write_json(args.json, {"fits": plan.fits, **plan.to_json(), **_versions()})
  if not plan.fits:
    print(f"does not fit: the step's peak is {plan.peak / plan.memory:.1%} of a chip's memory")
    return EXIT_DOES_NOT_FIT
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
