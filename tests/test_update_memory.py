"""benchmarks/update_memory.py: per-device state bytes from the trainers' layout, and the compiled
update step's analysis on a tiny tree (float32 state: no temporary arrays; the peak counts parameters,
gradients and state once each, the donated ones aliased to the outputs)."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from benchmarks import update_memory
from examples.training import devices

# A matrix the fsdp rule splits (8192 elements, last axis divisible) and a vector it does not.
SHAPES = {"w": (64, 128), "b": (128,)}


def test_per_device_bytes_follow_the_sharding():
  mesh = Mesh(jax.devices()[:8], (devices.FSDP_AXIS,))
  tree = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in SHAPES.items()}
  shardings = {
    "w": NamedSharding(mesh, PartitionSpec(None, devices.FSDP_AXIS)),
    "b": NamedSharding(mesh, PartitionSpec()),
  }
  assert update_memory.per_device_bytes(tree, shardings) == (64 * 128 // 8 + 128) * 4


@pytest.mark.parametrize("fsdp", [1, 8])
def test_float32_state_needs_no_temporaries(monkeypatch, fsdp):
  monkeypatch.setitem(update_memory.TREES, "tiny", lambda: SHAPES)
  row = update_memory.analyse("tiny", "float32", jax.devices()[:fsdp])
  per_device = (64 * 128 // fsdp + 128) * 4  # one float32 copy of the parameters
  # Padam's three moments, plus two int32 counters (the rule's and the schedule's, if any).
  assert 3 * per_device <= row["state"] * update_memory.MB <= 3 * per_device + 16
  assert row["temporaries"] * update_memory.MB <= 64  # a few scalars, no array
  # Parameters, gradients and state are live at once; nothing else is.
  assert row["peak"] * update_memory.MB >= 5 * per_device
  assert row["peak"] * update_memory.MB <= 5 * per_device + 1024
  assert row["bytes accessed GB"] > 0


@pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason='libtpu is not installed (pip install -e ".[tpu-plan]")',
)
def test_8bit_update_of_a_large_leaf_holds_at_most_two_float32_copies_of_it_on_tpu(monkeypatch):
  # XLA:TPU (one v5e chip, compiled without a TPU): updated whole, this embedding's 8-bit update
  # held 329 MB of temporaries, 6.5 times its float32 size; in slices of rows (the default
  # chunk_size), 53 MB: the float32 updates it returns, and one slice's work.
  shapes = {"embed": (16384, 768), "kernel": (768, 768), "bias": (768,)}
  monkeypatch.setitem(update_memory.TREES, "large", lambda: shapes)
  chip = update_memory.target_devices("v5e:2x2")[:1]
  row = update_memory.analyse("large", "8-bit", chip)
  assert row["state"] > 0
  assert row["temporaries"] * update_memory.MB <= 2 * 16384 * 768 * 4
