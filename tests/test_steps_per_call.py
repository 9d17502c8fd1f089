"""``--steps-per-call``: one call to the devices runs K train steps, each cutting its batch from
the training data on the devices. For a fixed seed every K gives the same metrics, for both
trainers, on one device, on eight and on a ``data=2,fsdp=4`` mesh."""

import os

import numpy as np
import pytest
from test_cifar10 import synthetic_cifar
from test_multiprocess import WideNet
from test_ptb import PATTERN, TEST_SPECS, write_corpus

from examples import metrics
from examples.cifar10 import __main__ as cifar10_main
from examples.cifar10 import models as cifar_models
from examples.ptb import __main__ as ptb_main
from examples.ptb import models as ptb_models

# optax's step-decay schedule compares a float with the int32 step (see test_training.py).
pytestmark = pytest.mark.standard_promotion

LAYOUTS = {"one": ["--devices", "1"], "eight": [], "fsdp": ["--mesh", "data=2,fsdp=4"]}
# A step a call, 8 steps a call (10-step epochs: a call of 2 ends each), and the default.
CALLS = {"1": ["--steps-per-call", "1"], "8": ["--steps-per-call", "8"], "default": []}


def without_timing(history):
  return [
    {k: v for k, v in r.items() if "seconds" not in k and "per_second" not in k} for r in history
  ]


@pytest.fixture
def trainers(tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # main() may add XNNPACK's
  monkeypatch.setitem(cifar_models.MODELS, "wide", WideNet)  # its 3072 x 16 matrix splits on fsdp
  for name, spec in TEST_SPECS.items():
    monkeypatch.setitem(ptb_models.MODELS, name, spec)
  np.savez(tmp_path / "cifar10.npz", **synthetic_cifar(n_train=80, n_test=16))
  write_corpus(tmp_path, PATTERN * 44, PATTERN * 2, PATTERN * 2)
  common = ["--epochs", "2", "--batch-size", "8", "--no-progress", "--no-xnnpack"]
  common += ["--data-dir", str(tmp_path)]
  return {
    "cifar10": (cifar10_main.main, [*common, "--model", "wide", "--eval-batch-size", "16"]),
    "ptb": (
      ptb_main.main,
      [*common, "--model", "test-dropout", "--optimizer", "padam", "--eval-batch-size", "8"],
    ),
  }


@pytest.mark.parametrize("trainer", ["cifar10", "ptb"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_number_of_steps_per_call_gives_the_same_run(tmp_path, trainers, trainer, layout):
  main, args = trainers[trainer]
  runs = {}
  for calls, flags in CALLS.items():
    workdir = tmp_path / f"{trainer}-{layout}-{calls}"
    assert main([*args, *LAYOUTS[layout], *flags, "--workdir", str(workdir)]) == 0
    runs[calls] = without_timing(metrics.read_metrics(workdir))
  assert runs["1"][0]["step"] == 10, "the test wants 10-step epochs"
  for calls in ("8", "default"):
    for a, b in zip(runs[calls], runs["1"], strict=True):
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=f"{calls}: {key}")
