"""The one results format of the trainers: ``WORKDIR/metrics.jsonl``, one JSON object per epoch.

Written by :func:`examples.training.train`; read here by plots, tables and benchmarks. This module
imports nothing heavier than the standard library so that readers need neither JAX nor Flax.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
# Written when a run stops on a non-finite loss or state: {"after_epoch": N, "reason": "..."}.
STOPPED_FILE = "stopped.json"


def metrics_path(workdir: str | os.PathLike) -> pathlib.Path:
  """``WORKDIR/metrics.jsonl``; a path that already names a ``.jsonl`` file is returned as is."""
  path = pathlib.Path(workdir)
  return path if path.suffix == ".jsonl" else path / METRICS_FILE


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The per-epoch records of a run, in epoch order.

  Args:
    workdir: a run's folder, or the path of a ``metrics.jsonl`` file.

  Returns:
    One dict per finished epoch (``epoch``, ``step``, ``lr``, ``train_loss``, ..., as written).

  Raises:
    FileNotFoundError: if there is no metrics file.
    ValueError: if a line is not a JSON object, or its epoch repeats or precedes the line before
      (two runs wrote to one folder); the message names the file and line.
  """
  path = metrics_path(workdir)
  records = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number} is not valid JSON: {e}") from e
      if not isinstance(record, dict):
        raise ValueError(f"{path}:{number} is not a JSON object")
      if records and record.get("epoch", 0) <= records[-1].get("epoch", 0):
        raise ValueError(
          f"{path}:{number} records epoch {record.get('epoch')} after epoch "
          f"{records[-1].get('epoch')}: the file mixes runs (two runs wrote to one folder?)"
        )
      records.append(record)
  return records


def write_metrics(workdir: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> None:
  """Replaces the metrics file with ``records`` (used when a resumed run restores its history)."""
  path = metrics_path(workdir)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w") as f:
    for record in records:
      f.write(json.dumps(dict(record)) + "\n")
  os.replace(tmp, path)


def append_metrics(workdir: str | os.PathLike, record: Mapping[str, Any]) -> None:
  """Appends one epoch's record to the metrics file."""
  with open(metrics_path(workdir), "a") as f:
    f.write(json.dumps(dict(record)) + "\n")


def read_stopped(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """Why the run stopped before its last epoch (``stopped.json``), or None if it did not."""
  try:
    with open(pathlib.Path(workdir) / STOPPED_FILE) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def read_run(workdir: str | os.PathLike) -> dict[str, Any]:
  """The run's description (``run.json``: config, optimizer hyperparameters, devices, ...)."""
  with open(pathlib.Path(workdir) / RUN_FILE) as f:
    return json.load(f)
