"""The training loop shared by the example trainers (CIFAR-10 images, Penn Treebank language models).

A trainer describes its problem as a :class:`Task` (model, batches, loss, evaluation) and a config
derived from :class:`LoopConfig`; :func:`train` does the rest, the same way for every task. Its
modules, each one concern:

- :mod:`~examples.training.task`: the :class:`Task` a trainer fills in, and the :class:`Evaluator`.
- :mod:`~examples.training.settings`: :class:`LoopConfig` and the checks that need no data.
- :mod:`~examples.training.devices`: the ``data`` x ``fsdp`` mesh, shardings, processes.
- :mod:`~examples.training.steps`: the model and optimizer state, the jitted train and eval steps.
- :mod:`~examples.training.checkpoints`: save, digest, verify, fall back.
- :mod:`~examples.training.records`: the workdir: its lock, run.json, metrics.jsonl, resume rules.
- :mod:`~examples.training.preemption`: stopping on SIGTERM/SIGINT, saving on a clock.
- :mod:`~examples.training.progress`: the progress bar and the per-epoch line.
- :mod:`~examples.training.divergence`: the stop on a NaN or an infinity.
- :mod:`~examples.training.epoch`: one epoch, a call at a time (``--steps-per-call``).
- :mod:`~examples.training.loop`: :func:`train`, epoch by epoch.

What a trainer needs is importable from here.
"""

from examples.training.checkpoints import CheckpointError, fingerprint
from examples.training.devices import FSDP_MIN_SIZE, fsdp_spec
from examples.training.divergence import NonFiniteLossError
from examples.training.loop import train
from examples.training.preemption import Preempted
from examples.training.records import check_run
from examples.training.settings import LoopConfig
from examples.training.task import Evaluator, Task

__all__ = [
  "FSDP_MIN_SIZE",
  "CheckpointError",
  "Evaluator",
  "LoopConfig",
  "NonFiniteLossError",
  "Preempted",
  "Task",
  "check_run",
  "fingerprint",
  "fsdp_spec",
  "train",
]
