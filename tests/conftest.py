"""Test-wide JAX settings.

Eight host CPU devices let the sharding tests build a real multi-device mesh on
any machine; the flag must be set before JAX initialises its backends.
Strict dtype promotion and rank promotion errors make an optimizer that leaks
float64 or broadcasts by accident fail loudly. Tests of third-party model code
that is not written for strict promotion opt out with
``pytestmark = pytest.mark.standard_promotion``.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax
import pytest


def pytest_configure(config):
  config.addinivalue_line(
    "markers", "standard_promotion: run with JAX's default dtype/rank promotion"
  )


@pytest.fixture(autouse=True)
def _strict_promotion(request):
  if request.node.get_closest_marker("standard_promotion"):
    yield
    return
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
    yield
