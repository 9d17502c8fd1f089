"""The trainers' mesh and launch flags, the FSDP layout rule, checkpoints across layouts, and the
memory table of docs/scaling.md.

The runs themselves (several processes, ``--mesh data=2,fsdp=4`` against one device) are in
tests/test_multiprocess.py.
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_faults import _no_data_no_model, _one_line_error

from examples import cli, training
from examples.cifar10 import __main__ as cifar10_main
from examples.training import devices, records
from examples.training.checkpoints import Checkpoints, host_leaves, state_digest

BAD_FLAGS = [
  (["--mesh", "data=2,fsdp=3"], "--mesh data=2,fsdp=3 is not valid; its sizes multiply to 6"),
  (["--mesh", "fsdp=8", "--devices", "4"], "multiply to 8, but the run uses 4 devices"),
  (["--mesh", "data=2,model=4"], "unknown axis 'model'"),
  (["--mesh", "data2,fsdp=4"], "expected AXIS=SIZE pairs"),
  (["--mesh", "fsdp=0"], "the size of 'fsdp' must be a positive integer"),
  (["--mesh", "data=2,data=4"], "axis 'data' is given twice"),
  (["--coordinator", "localhost"], "--coordinator 'localhost' is not valid; expected HOST:PORT"),
  (["--coordinator", "host:99999"], "expected HOST:PORT"),
  (["--num-processes", "2"], "--num-processes 2 is not valid without --coordinator"),
  (["--process-id", "1"], "--process-id 1 is not valid without --coordinator"),
  (["--coordinator", "h:1234", "--process-id", "0"], "add --num-processes N"),
  (["--coordinator", "h:1234", "--num-processes", "0", "--process-id", "0"], "--num-processes 0"),
  (["--coordinator", "h:1234", "--num-processes", "2", "--process-id", "2"], "--process-id 2"),
]


@pytest.mark.parametrize(("extra", "words"), BAD_FLAGS, ids=[" ".join(e) for e, _ in BAD_FLAGS])
def test_a_bad_mesh_or_launch_flag_is_one_line_before_any_data_or_model(
  tmp_path, capsys, monkeypatch, extra, words
):
  _no_data_no_model(monkeypatch)
  monkeypatch.setattr(jax.distributed, "initialize", _must_not_join)
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # main() may add XNNPACK's
  argv = ["--workdir", str(tmp_path / "run"), "--data-dir", str(tmp_path), "--no-xnnpack", *extra]
  assert cifar10_main.main(argv) == cli.EXIT_USAGE
  _one_line_error(capsys, words, "is not valid")


def _must_not_join(*args, **kwargs):
  raise AssertionError("joined a multi-process run")


def test_launch_flags_give_initializes_arguments():
  def settings(**flags):
    defaults = dict(distributed=False, coordinator=None, num_processes=None, process_id=None)
    return cli.distributed_settings(argparse.Namespace(**{**defaults, **flags}))

  assert settings() is None
  assert settings(distributed=True) == {}  # the cluster's environment says the rest
  assert settings(coordinator="10.0.0.1:8476", num_processes=4, process_id=3) == {
    "coordinator_address": "10.0.0.1:8476",
    "num_processes": 4,
    "process_id": 3,
  }


def test_mesh_text_and_sizes():
  assert devices.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
  assert devices.parse_mesh(" fsdp = 8 ") == {"data": 1, "fsdp": 8}
  assert devices.mesh_sizes(None, 8) == {"data": 8, "fsdp": 1}
  assert devices.mesh_sizes("fsdp=4,data=2", 8) == {"data": 2, "fsdp": 4}
  mesh = devices.make_mesh(None, "data=2,fsdp=4")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4} and mesh.devices.size == 8


def test_fsdp_splits_the_largest_dividing_dimension_of_large_arrays():
  spec = training.fsdp_spec
  min_size = training.FSDP_MIN_SIZE
  assert spec((3, 3, 64, 128), 4) == P(None, None, None, "fsdp")
  assert spec((512, 10), 4) == P("fsdp", None)  # 10 is not divisible by 4
  assert spec((64, 64, 3), 8) == P("fsdp", None, None)  # the first of equal dimensions
  assert spec((min_size,), 4) == P("fsdp")
  assert spec((min_size - 1,), 1) == spec((min_size - 1,), 4) == P()  # small: replicated
  assert spec((3, 3, 63, 65), 4) == P()  # no dimension divides
  assert spec((3, 3, 64, 128), 1) == P()  # no fsdp axis: replicated


def test_a_checkpoint_restores_onto_another_layout_and_verifies(tmp_path):
  sharded_mesh = devices.make_mesh(None, "data=2,fsdp=4")
  values = {
    "kernel": np.arange(64 * 128, dtype=np.float32).reshape(64, 128),
    "bias": np.ones(128, np.float32),
    "key": jax.random.key(3),
  }
  arrays = {k: v for k, v in values.items() if k != "key"}
  state = {
    **jax.device_put(arrays, devices.state_shardings(arrays, sharded_mesh)),
    "key": values["key"],
  }
  assert state["kernel"].sharding.spec == P(None, "fsdp")
  assert {s.data.shape for s in state["kernel"].addressable_shards} == {(64, 32)}
  replicated = NamedSharding(devices.make_mesh(None, None), P())
  like = {**jax.device_put(jax.tree.map(jnp.zeros_like, arrays), replicated), "key": values["key"]}
  with Checkpoints(tmp_path / "checkpoints") as checkpoints:
    assert checkpoints.save(1, state, {"epoch": 1, "history": [], "config": {}, "rng": []})
    restored, meta = checkpoints.restore(1, like)
  # The digest is of the whole arrays, whatever their layout: it verifies on the other one.
  assert meta["sha256"] == state_digest(host_leaves(values))
  assert restored["kernel"].sharding == replicated
  np.testing.assert_array_equal(restored["kernel"], values["kernel"])
  np.testing.assert_array_equal(
    jax.random.key_data(restored["key"]), jax.random.key_data(values["key"])
  )


def test_the_memory_table_splits_padams_state_about_k_ways():
  from benchmarks import state_memory

  params, state = state_memory.resnet18()
  assert 11.1e6 < state_memory.count(params) < 11.2e6
  whole = state_memory.memory(params, state, 1)
  # mu, nu and nu_max: 12 bytes per parameter, plus a few counters.
  assert 0 <= whole["optimizer_state_bytes"] - 12 * state_memory.count(params) < 64
  for k in (2, 4, 8):
    split = state_memory.memory(params, state, k)
    ratio = split["optimizer_state_bytes_per_device"] / whole["optimizer_state_bytes"]
    assert 1 / k <= ratio < 1.02 / k, (k, ratio)


def test_processes_with_other_settings_or_data_are_refused(tmp_path, monkeypatch):
  from jax.experimental import multihost_utils
  from test_training import ToyTask, config

  first = []

  def allgather(digest):
    """Two processes: this one, and one that ran the first call's settings."""
    first.append(digest)
    return np.stack([digest, first[0]])

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  records.check_same_on_every_process(config(tmp_path), ToyTask())
  # Another workdir name is the same run (a folder may be named apart on another host).
  records.check_same_on_every_process(config(tmp_path, "elsewhere"), ToyTask())
  with pytest.raises(ValueError, match=r"differ in their settings or data \(process 0 and"):
    records.check_same_on_every_process(config(tmp_path, seed=1), ToyTask())
