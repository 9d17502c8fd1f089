"""``--steps-per-call``: one call to the devices runs K train steps, each cutting its batch from
the training data on the devices. For a fixed seed every K gives the same metrics, for both
trainers, on one device, on eight and on a ``data=2,fsdp=4`` mesh, with a dense CIFAR-10 network
and an LSTM; with a convolutional network (ResNet-8 at half width) the numbers of K > 1 agree with
K = 1 within the bound docs/trainers.md states, as XLA:CPU compiles a convolution inside a loop
differently from one outside it."""

import os

import jax
import numpy as np
import pytest
from test_cifar10 import synthetic_cifar
from test_multiprocess import WideNet
from test_ptb import PATTERN, TEST_SPECS, write_corpus

from examples import metrics
from examples.cifar10 import __main__ as cifar10_main
from examples.cifar10 import models as cifar_models
from examples.cifar10 import train as cifar10_train
from examples.ptb import __main__ as ptb_main
from examples.ptb import models as ptb_models
from examples.training import epoch, settings

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
    "resnet": (cifar10_main.main, [*common, "--model", "resnet8_w0.5", "--eval-batch-size", "16"]),
    "ptb": (
      ptb_main.main,
      [*common, "--model", "test-dropout", "--optimizer", "padam", "--eval-batch-size", "8"],
    ),
  }


# The convolutional model on one device (its compile is the slowest): relative bound on its metrics.
CONVOLUTION_RTOL = 1e-4
CASES = [(t, layout) for t in ("cifar10", "ptb") for layout in LAYOUTS] + [("resnet", "one")]


@pytest.mark.parametrize(("trainer", "layout"), CASES)
def test_every_number_of_steps_per_call_gives_the_same_run(tmp_path, trainers, trainer, layout):
  main, args = trainers[trainer]
  runs = {}
  # On a CPU the default is the K = 1 run's program (the test below): K = 1 and 8 run there. An
  # accelerator runs its default too, but the convolutional case (the slowest compile) never.
  cpu = jax.default_backend() == "cpu"
  cases = {k: v for k, v in CALLS.items() if k != "default" or not (cpu or trainer == "resnet")}
  for calls, flags in cases.items():
    workdir = tmp_path / f"{trainer}-{layout}-{calls}"
    assert main([*args, *LAYOUTS[layout], *flags, "--workdir", str(workdir)]) == 0
    runs[calls] = without_timing(metrics.read_metrics(workdir))
  assert runs["1"][0]["step"] == 10, "the test wants 10-step epochs"
  for calls in runs.keys() - {"1"}:
    for a, b in zip(runs[calls], runs["1"], strict=True):
      assert a.keys() == b.keys()
      for key in a:
        if trainer != "resnet":
          np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=f"{calls}: {key}")
        elif key.endswith("_acc"):  # 16 test images: one image is 0.0625
          np.testing.assert_allclose(a[key], b[key], atol=0.0625 + 1e-9, err_msg=key)
        else:
          np.testing.assert_allclose(a[key], b[key], rtol=CONVOLUTION_RTOL, err_msg=key)


def test_the_default_is_one_step_a_call_on_a_cpu(tmp_path):
  default = cifar10_train.Config(workdir=str(tmp_path / "d"))
  assert epoch.steps_per_call(default) == (
    1 if jax.default_backend() == "cpu" else settings.DEFAULT_STEPS_PER_CALL
  )
