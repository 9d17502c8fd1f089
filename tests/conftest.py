"""Test-wide JAX settings.

Eight host CPU devices let the sharding tests build a real multi-device mesh on
any machine; the flag must be set before JAX initialises its backends. XLA:CPU's
backend (LLVM) optimizations are off: the tests' programs are tiny, compiling is
much of what they spend their time on, and it is shorter without them.
The flags reach the trainer subprocesses the tests start.
Strict dtype promotion and rank promotion errors make an optimizer that leaks
float64 or broadcasts by accident fail loudly. Tests of third-party model code
that is not written for strict promotion opt out with
``pytestmark = pytest.mark.standard_promotion``.
"""

import os
import shutil
import tempfile

# The tests run on the CPU (with libtpu installed, for the pod planner's tests, JAX would otherwise
# try to open a TPU in every process); a TPU topology is compiled for without a backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Once each (an xdist worker inherits its controller's flags).
os.environ["XLA_FLAGS"] = " ".join(
  dict.fromkeys(
    [
      *os.environ.get("XLA_FLAGS", "").split(),
      "--xla_force_host_platform_device_count=8",
      "--xla_backend_optimization_level=0",
    ]
  )
)

# Many tests compile the same small programs again (a run and its resumption, a trainer run in a
# subprocess): JAX's persistent compilation cache, in a folder of this test session only (the
# variables reach the subprocesses too), compiles each of them once.
# pytest-xdist's workers share the folder their controller made.
os.environ["PADAM_JAX_TESTS_XLA_CACHE"] = (
  os.environ["PADAM_JAX_TESTS_XLA_CACHE"]
  if "PYTEST_XDIST_WORKER" in os.environ
  else tempfile.mkdtemp(prefix="padam-jax-tests-xla-cache-")
)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["PADAM_JAX_TESTS_XLA_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax
import pytest


def pytest_configure(config):
  config.addinivalue_line(
    "markers", "standard_promotion: run with JAX's default dtype/rank promotion"
  )


def pytest_unconfigure(config):
  if not hasattr(config, "workerinput"):  # the controller (or a run without workers) cleans up
    shutil.rmtree(os.environ["PADAM_JAX_TESTS_XLA_CACHE"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _strict_promotion(request):
  if request.node.get_closest_marker("standard_promotion"):
    yield
    return
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
    yield
