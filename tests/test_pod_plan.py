"""The pod planner (benchmarks.pod_plan): the trainers' own steps compiled for TPU topologies that
are not attached, on tiny models.

The compiled tests need ``libtpu`` (``pip install -e ".[tpu-plan]"``) and skip without it; the
reading of a compiled program's collectives is tested on its own.
"""

import importlib.util

import jax
import pytest

from benchmarks import pod_plan
from examples import cli
from examples.training import devices, records, settings, steps

pytestmark = pytest.mark.standard_promotion

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason='libtpu is not installed (pip install -e ".[tpu-plan]")',
)

HLO = """\
%all-reduce-scatter.2 (input_0: f32[128,32], input_1: f32[128,32]) -> (f32[32,32], f32[32,32]) {
  %input_0 = f32[128,32]{1,0} parameter(0)
  %all-reduce.43 = (f32[128,32]{1,0}, f32[128,32]{1,0}) all-reduce(%input_0, %input_1), channel_id=1
}

ENTRY %main (p: f32[8,16]) -> f32[64,16] {
  %all-gather-start = (f32[8,16]{1,0}, f32[64,16]{1,0}) all-gather-start(f32[8,16]{1,0} %p), dimensions={0}
  %all-gather-done = f32[64,16]{1,0} all-gather-done(%all-gather-start)
  %all-reduce.1 = (bf16[10]{0}, f32[]{:T(128)}) all-reduce(%a, %b), to_apply=%add
  %fusion.296 = (f32[32,32]{1,0:T(8,128)S(1)}, f32[32,32]{1,0}) fusion(%x, %y), kind=kCustom, calls=%all-reduce-scatter.2
  %add.1 = f32[64,16]{1,0} add(%all-gather-done, %all-gather-done)
}
"""


def test_collectives_are_counted_once_each_with_their_whole_buffers():
  found = pod_plan.collectives(HLO)
  # The asynchronous all-gather once, at its gathered size (64 x 16 float32).
  assert found["all-gather"] == {"count": 1, "bytes": 64 * 16 * 4}
  # XLA:TPU's reduce-scatter: the fusion calling all-reduce-scatter, at its inputs' size; the
  # all-reduce inside it is not counted again.
  assert found["reduce-scatter"] == {"count": 1, "bytes": 2 * 128 * 32 * 4}
  assert found["all-reduce"] == {"count": 1, "bytes": 10 * 2 + 4}
  assert found["all-to-all"]["count"] == found["collective-permute"]["count"] == 0


def _config(trainer, *flags):
  config_type, _ = pod_plan._trainer(trainer)
  parser = pod_plan.argparse.ArgumentParser()
  cli.add_config_flags(parser, config_type, omit=pod_plan.PLAN_OMITS, launch_flags=False)
  return cli.config_from_args(config_type, parser.parse_args(list(flags)))


def _state_bytes_on_cpu(trainer, config, count):
  """run.json's optimizer_state_bytes_per_device for ``config`` on ``count`` of this machine's
  (CPU) devices: the state made and measured as a run makes and measures it."""
  _, make_task = pod_plan._trainer(trainer)
  task = make_task(config)
  setup = settings.make_optimizer(task, config)
  mesh = devices.make_mesh(count, config.mesh)
  _, state = steps.make_state(task, setup.tx, jax.random.key(0), mesh)
  return records.state_memory(state)


@needs_libtpu
@pytest.mark.parametrize(
  ("trainer", "topology", "flags"),
  [
    (
      "cifar10",
      "v5e:2x2",
      ["--model", "resnet8", "--batch-size", "8", "--train-size", "64", "--state-bits", "8"],
    ),
    ("ptb", "v4:2x2x1", ["--model", "transformer-tiny", "--batch-size", "8"]),
  ],
)
def test_a_trainers_step_compiles_for_a_tpu_with_its_state_split_as_on_any_mesh(
  trainer, topology, flags
):
  config = _config(trainer, *flags, "--mesh", "fsdp=4", *_small_data(trainer))
  plan = pod_plan.make_plan(trainer, config, topology, traced_p=True)
  assert plan.devices == 4 and plan.mesh == {"data": 1, "fsdp": 4}
  # Every state array is where the trainers' rule puts it, in and out of the compiled step; the
  # 8-bit codes and their scales included.
  assert plan.checks["mismatched"] == []
  assert plan.checks["split_over_fsdp"] > 0
  # Per device, the state the compiled step takes is what run.json reports for such a run.
  memory = _state_bytes_on_cpu(trainer, config, 4)
  assert plan.optimizer_state == memory["optimizer_state_bytes_per_device"]
  assert plan.params == memory["param_bytes_per_device"]
  # FSDP gathers the parameters and brings the gradients back to their shards.
  assert plan.collectives["all-gather"]["count"] > 0
  assert plan.collectives["reduce-scatter"]["count"] > 0
  assert 0 < plan.peak < plan.memory and plan.flops > 0 and plan.bytes_accessed > 0
  assert plan.roofline()["estimate"] > 0
  assert plan.command[0] == f"python -m examples.{trainer}" and "--distributed" in plan.command


def _small_data(trainer):
  return ["--train-size", "64"] if trainer == "cifar10" else ["--train-tokens", "4000"]


@needs_libtpu
def test_the_command_line_prints_a_plan_and_refuses_bad_flags_in_one_line(capsys, tmp_path):
  out = tmp_path / "plan.json"
  flags = ["--model", "lstm2-tiny", "--batch-size", "8", "--train-tokens", "4000"]
  assert pod_plan.main(["--topology", "v5e:2x2", "--json", str(out), "ptb", *flags]) == 0
  text = capsys.readouterr().out
  assert "peak" in text and "launch: each of the 1 host(s)" in text
  assert pod_plan.json.loads(out.read_text())["fits"] is True
  assert pod_plan.main(["--topology", "v5e:9x9", "ptb", *flags]) == 2
  assert "--topology v5e:9x9: cannot describe it" in capsys.readouterr().err
  assert (
    pod_plan.main(["--topology", "v5e:2x2", "ptb", "--model", "lstm2-tiny", "--batch-size", "6"])
    == 2
  )
  assert "multiple of the 4 devices" in capsys.readouterr().err


def _record(name, **fields):
  record = {
    "fits": True,
    "params": 2e6,
    "optimizer_state": 6e6,
    "temporaries": 1e6,
    "peak": 1e7,
    "memory": 16 * 2**30,
    "flops": 1e12,
    "bytes_accessed": 2e9,
    "collectives": {
      "reduce-scatter": {"count": 3, "bytes": 6e6},
      "all-gather": {"count": 2, "bytes": 4e6},
    },
    "mesh": {"data": 1, "fsdp": 4},
    "roofline": {"estimate": 2.5e-3},
    "num_params": 5e8,
    "command": ["python -m benchmarks.pod_plan", name],
  }
  return {**record, **fields}


def test_the_pods_table_shows_each_plan_and_what_did_not_fit():
  from benchmarks import pods

  names = ["12x768-v5e-16x16-padamw-32", "24x1024-v5e-16x16-padamw-32", "12x768-v5e-16x16-adamw-32"]
  assert set(names) <= set(pods.plans())
  records = {
    names[0]: _record(names[0]),
    names[1]: _record(names[1], fits=False, peak=2e10),
    names[2]: {"fits": False, "reason": "RESOURCE_EXHAUSTED: 47.81G", "command": ["x"]},
  }
  table = pods.report(records)
  assert "(3 of 38 configurations)" in table
  rows = [line for line in table.splitlines() if line.startswith("| v5") and "chips)" not in line]
  assert len(rows) == 3
  # Per chip: MB, TFLOP, GB, collective MB (all kinds), reduce-scatters, roofline ms.
  assert "| 2.0 | 6.0 | 1.0 | 10.0 (0%) | 1.00 | 2.0 | 10.0 | 3 | 2.5 |" in rows[0]
  assert "does not fit: RESOURCE_EXHAUSTED: 47.81G" in rows[1] and "(116%: does not fit)" in rows[2]
  # The largest that fits, per slice and optimizer: the first planned size, the next one's peak.
  lines = table.splitlines()
  (padamw,) = [line for line in lines if "(256 chips) | padamw, float32 |" in line]
  assert "| 12x768 (500M) | 10 MB (0%) | 24x1024: peak 20,000 MB (116%) |" in padamw
  (adamw,) = [line for line in lines if "(256 chips) | adamw, float32 |" in line]
  assert "| none | - | 12x768: refused by XLA |" in adamw
