"""Command-line plumbing shared by the example trainers (``python -m examples.cifar10``, ...).

A trainer's config is a dataclass whose fields are made with :func:`setting`: the default, the help
text and the flag's details are written there once. Its ``__main__`` builds its parser with
:func:`add_config_flags` (a flag per field), calls :func:`configure_xla` before anything computes
(XLA reads ``$XLA_FLAGS`` when JAX starts its backend, at the first computation, not at import),
turns the parsed flags into its config with :func:`config_from_args`, and runs its
``train_and_evaluate`` through :func:`run`, which turns expected failures into one-line messages.

This module imports no JAX at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import numbers
import os
import pathlib
import shutil
import signal
import sys
import threading
import types
import typing
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

# XNNPACK kernels for XLA:CPU convolutions and matmuls: 1.3x-2x the images/s of a ResNet training
# step on this project's 2-core CPU (see the README); other backends ignore the flag.
XNNPACK_FLAG = "--xla_cpu_use_xnnpack=true"


def configure_xla(argv: Sequence[str] | None = None) -> None:
  """Adds the XLA:CPU fast paths to ``$XLA_FLAGS`` unless ``--no-xnnpack`` is in ``argv``.

  Call before JAX computes anything (importing JAX is fine). A ``--xla_cpu_use_xnnpack`` already in ``$XLA_FLAGS`` wins.
  """
  argv = sys.argv[1:] if argv is None else argv
  flags = os.environ.get("XLA_FLAGS", "")
  if "--no-xnnpack" in argv or "--xla_cpu_use_xnnpack" in flags:
    return
  os.environ["XLA_FLAGS"] = f"{flags} {XNNPACK_FLAG}".strip()


def parse_hparam(text: str) -> tuple[str, Any]:
  """``"p=0.25"`` -> ``("p", 0.25)``: the value is read as JSON when it is valid JSON, else a string."""
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
  try:
    return key, json.loads(value)
  except json.JSONDecodeError:
    return key, value


def setting(
  default: Any = dataclasses.MISSING,
  *,
  help: str | Callable[[], str],
  default_factory: Any = dataclasses.MISSING,
  **flag: Any,
) -> Any:
  """A config field whose metadata holds its help text and how it is set on the command line.

  The command-line flags of the trainers are made from these fields
  (``examples.cli.add_config_flags``); the default is written here only.

  Args:
    default: the field's default (or ``default_factory``, as for ``dataclasses.field``).
    help: what the field means, as the flag's help (or a function returning it, called when the
      parser is built). A default other than None, a bool or a mapping is appended to it.
    default_factory: as for ``dataclasses.field``.
    **flag: ``flag``: the flag's name without the dashes (default: the field's name with ``-``
      for ``_``; a bool that defaults to True becomes ``--no-NAME``); ``choices``: the valid values
      (checked when a config is made, and by the parser); ``metavar``; ``required``: required on the
      command line; ``cli=False``: no flag.
  """
  return dataclasses.field(
    default=default, default_factory=default_factory, metadata={"help": help, **flag}
  )


def field_metadata(config_type: type, name: str) -> dict[str, Any]:
  """The metadata of field ``name``, merged over the classes that declare it (a subclass that only
  changes a default keeps the base class's help)."""
  merged: dict[str, Any] = {}
  for klass in reversed(config_type.__mro__):
    declared = vars(klass).get("__dataclass_fields__", {})
    if name in declared:
      merged.update(declared[name].metadata)
  return merged


def check_choices(config: Any) -> None:
  """Raises ValueError, listing the valid values, for a field whose value is not in its ``choices``."""
  for f in dataclasses.fields(config):
    choices = field_metadata(type(config), f.name).get("choices")
    value = getattr(config, f.name)
    if choices is not None and value not in choices:
      valid = ", ".join(map(str, choices))
      raise ValueError(f"unknown {f.name} {value!r}; valid {f.name}s: {valid}")


def check_int(flag: str, value: Any, *, minimum: int | None = None, optional: bool = False) -> None:
  """Raises ValueError naming ``flag``, ``value`` and what is valid unless ``value`` is an int (not
  a bool) of at least ``minimum`` (or None, when ``optional``)."""
  if optional and value is None:
    return
  if (
    not isinstance(value, numbers.Integral)
    or isinstance(value, bool)
    or (minimum is not None and value < minimum)
  ):
    valid = "an integer" + ("" if minimum is None else f" >= {minimum}")
    raise ValueError(f"{flag} {value!r} is not valid; expected {valid}")


def check_number(
  flag: str, value: Any, *, positive: bool = False, minimum: float | None = None
) -> None:
  """Raises ValueError naming ``flag``, ``value`` and what is valid unless ``value`` is a finite
  number (not a bool), > 0 when ``positive``, >= ``minimum`` when given."""
  number = isinstance(value, numbers.Real) and not isinstance(value, bool)
  ok = number and math.isfinite(value)
  ok = ok and not (positive and value <= 0) and not (minimum is not None and value < minimum)
  if not ok:
    valid = "a finite number" + (" > 0" if positive else "")
    valid += "" if minimum is None else f" >= {minimum:g}"
    raise ValueError(f"{flag} {value!r} is not valid; expected {valid}")


# Exit statuses of the trainers (also in their --help and docs/trainers.md).
EXIT_OK = 0
EXIT_INTERNAL = 1  # an uncaught exception: Python prints its traceback and exits with 1
EXIT_USAGE = 2  # bad usage, settings or data; one line (argparse's usage errors are 2 as well)
EXIT_NON_FINITE = 3  # stopped on a non-finite loss or state; one line naming the last checkpoint
EXIT_PREEMPTED = 4  # stopped by SIGTERM or SIGINT after saving a checkpoint; resumable
EXIT_PEER_LOST = 5  # another process of the run was lost (examples.peers); resumable
EXIT_INTERRUPTED = 130  # Ctrl-C before training started (nothing to save); the shell's 128 + 2
# Seconds without a heartbeat after which a process of a multi-process run counts as lost.
PEER_TIMEOUT = 15.0
EXIT_STATUS_HELP = (
  "Exit status: 0 finished; 1 internal error (a traceback); 2 bad usage, settings or data (one "
  "line naming the option, the value and what is valid); 3 stopped on a non-finite loss or state, "
  "or a loss over 1,000 times a uniform prediction's (one line naming the last finite checkpoint and how to continue from it); 4 stopped by SIGTERM "
  "or SIGINT (Ctrl-C) during training, after saving a checkpoint of where it stood (one line: "
  "continue with --resume); 5 another process of a multi-process run was lost (one line naming it: "
  "start every process again with --resume); 130 Ctrl-C before training started (nothing was "
  "saved)."
)


class RunStopped(RuntimeError):
  """A run stopped before its end for a reason it reports in one line, with its exit status."""

  exit_status = EXIT_INTERNAL


SHARED_GROUP = "training (shared by every trainer)"


def _base_type(annotation: Any) -> Any:
  """``int | None`` -> ``int``; other annotations as they are."""
  if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
    (base,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return base
  return annotation


def _is_mapping(annotation: Any) -> bool:
  return typing.get_origin(annotation) in (Mapping, dict) or annotation in (Mapping, dict)


def _flag_kwargs(f: dataclasses.Field, annotation: Any, meta: Mapping[str, Any]) -> dict[str, Any]:
  """``add_argument``'s keywords (but the name) for field ``f`` of type ``annotation``."""
  text = meta["help"]() if callable(meta["help"]) else meta["help"]
  kwargs: dict[str, Any] = {"dest": f.name, "help": text.replace("%", "%%")}
  base = _base_type(annotation)
  if base is bool:
    nullable = base is not annotation
    kwargs["action"] = argparse.BooleanOptionalAction if nullable else "store_true"
    if f.default is True:
      kwargs["action"] = "store_false"
    return kwargs
  if _is_mapping(base):
    return {**kwargs, "action": "append", "type": parse_hparam, "default": []}
  kwargs["type"] = base
  if meta.get("required"):
    kwargs["required"] = True
  elif f.default is not None:
    kwargs["help"] += " (default: %(default)s)"
  if "choices" in meta:
    kwargs["choices"] = list(meta["choices"])
  return kwargs


def _add_flag(group: Any, f: dataclasses.Field, annotation: Any, meta: Mapping[str, Any]) -> None:
  name = meta.get("flag", f.name.replace("_", "-"))
  if f.default is True:
    name = f"no-{name}"
  kwargs = _flag_kwargs(f, annotation, meta)
  if kwargs.get("action") in (None, "append"):
    kwargs["metavar"] = meta.get("metavar", name.upper().replace("-", "_"))
  if "default" not in kwargs and f.default is not dataclasses.MISSING:
    kwargs["default"] = f.default
  group.add_argument(f"--{name}", **kwargs)


def add_config_flags(
  parser: argparse.ArgumentParser,
  config_type: type,
  omit: Collection[str] = (),
  launch_flags: bool = True,
) -> None:
  """Adds a flag for every field of the dataclass ``config_type`` made with :func:`setting`, but
  those named in ``omit`` (they keep their defaults).

  The fields of its root class (``examples.training.LoopConfig``) go in a group shared by every
  trainer, together with ``--no-xnnpack`` and the launch flags (``--distributed``,
  ``--coordinator``, ``--num-processes``, ``--process-id``; not with ``launch_flags`` False); the
  task's own fields come first.
  A field ``name`` is set by ``--name`` (``_`` as ``-``, or its ``flag`` metadata) with the type of its
  annotation; a bool is a switch (``--no-NAME`` when it defaults to True; ``--NAME/--no-NAME`` when
  it may be None); a mapping is a repeatable ``KEY=VALUE`` (:func:`parse_hparam`). The default is
  the field's, appended to the help when it is not None (nor a switch's or a mapping's).
  """
  root = [k for k in config_type.__mro__ if dataclasses.is_dataclass(k)][-1]
  shared_names = {f.name for f in dataclasses.fields(root)}
  shared = parser.add_argument_group(SHARED_GROUP)
  annotations = typing.get_type_hints(config_type)
  own = [f for f in dataclasses.fields(config_type) if f.name not in shared_names]
  common = [f for f in dataclasses.fields(config_type) if f.name in shared_names]
  for group, fields in ((parser, own), (shared, common)):
    for f in fields:
      meta = field_metadata(config_type, f.name)
      if meta.get("cli", True) and "help" in meta and f.name not in omit:
        _add_flag(group, f, annotations[f.name], meta)
  if launch_flags:
    shared.add_argument(
      "--no-xnnpack",
      action="store_true",
      help=f"do not add {XNNPACK_FLAG} to $XLA_FLAGS (XLA:CPU only)",
    )
    _add_launch_flags(shared)


def _add_launch_flags(group: Any) -> None:
  """The flags of a multi-process launch (see :func:`distributed_settings`)."""
  group.add_argument(
    "--distributed",
    action="store_true",
    help="call jax.distributed.initialize() first, with what the cluster provides (a TPU pod, "
    "Slurm, Open MPI, ...): every process runs the same command",
  )
  group.add_argument(
    "--coordinator",
    metavar="HOST:PORT",
    help="launch by hand: the address where process 0 runs the coordinator; every process runs "
    "the same command but --process-id (with --num-processes)",
  )
  group.add_argument(
    "--num-processes", type=int, metavar="N", help="number of processes (with --coordinator)"
  )
  group.add_argument(
    "--process-id", type=int, metavar="I", help="this process: 0 to N-1 (with --coordinator)"
  )
  group.add_argument(
    "--peer-timeout",
    type=float,
    default=PEER_TIMEOUT,
    metavar="S",
    help="with several processes: a process without a heartbeat for S seconds is lost, and every "
    f"other one exits with status 5 (default: {PEER_TIMEOUT:g})",
  )


def distributed_settings(args: argparse.Namespace) -> dict[str, Any] | None:
  """The keywords of ``jax.distributed.initialize`` the launch flags ask for, or None.

  ``--coordinator HOST:PORT`` with ``--num-processes N`` and ``--process-id I`` give them all;
  ``--distributed`` alone gives none (JAX finds them in the cluster's environment).

  Raises:
    ValueError: one line naming the flag, its value and what is valid.
  """
  coordinator = getattr(args, "coordinator", None)
  count = getattr(args, "num_processes", None)
  index = getattr(args, "process_id", None)
  if coordinator is None:
    for flag, value in (("--num-processes", count), ("--process-id", index)):
      if value is not None:
        raise ValueError(
          f"{flag} {value} is not valid without --coordinator HOST:PORT (the address of process 0)"
        )
    return {} if getattr(args, "distributed", False) else None
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(
      f"--coordinator {coordinator!r} is not valid; expected HOST:PORT, e.g. 10.0.0.1:8476"
    )
  if count is None or index is None:
    raise ValueError(
      f"--coordinator {coordinator} is not valid alone; add --num-processes N (how many "
      "processes) and --process-id I (this one's number, 0 to N-1)"
    )
  check_int("--num-processes", count, minimum=1)
  if not 0 <= index < count:
    raise ValueError(
      f"--process-id {index} is not valid; expected 0 to {count - 1} (one number per process of "
      f"--num-processes {count})"
    )
  return {"coordinator_address": coordinator, "num_processes": count, "process_id": index}


def initialize_distributed(args: argparse.Namespace) -> None:
  """Joins a multi-process run as the launch flags say (:func:`distributed_settings`); nothing
  without them. Call it before JAX computes anything.

  XLA:CPU's collectives between processes use Gloo (unless ``$JAX_CPU_COLLECTIVES_IMPLEMENTATION``
  names another), so that a run of several CPU processes works as one of several hosts.
  """
  settings = distributed_settings(args)
  if settings is None:
    return
  import jax

  from examples import peers

  timeout = getattr(args, "peer_timeout", PEER_TIMEOUT)
  check_number("--peer-timeout", timeout, positive=True)
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**settings)
  peers.watch(timeout, EXIT_PEER_LOST)


def config_from_args(config_type: type, args: argparse.Namespace) -> Any:
  """The config of type ``config_type`` from the flags that :func:`add_config_flags` added."""
  annotations = typing.get_type_hints(config_type)
  values = {}
  for f in dataclasses.fields(config_type):
    if not hasattr(args, f.name):
      continue  # a field without a flag keeps its default
    value = getattr(args, f.name)
    values[f.name] = dict(value) if _is_mapping(_base_type(annotations[f.name])) else value
  return config_type(**values)


def config_flags(config: Any) -> list[str]:
  """The command-line flags that make ``config`` (the inverse of :func:`config_from_args`).

  Only fields that differ from their defaults and have a flag are written; a mapping gives one
  ``--NAME KEY=JSON`` per item. A field without a flag that differs from its default raises
  ValueError, since no command line can set it.
  """
  annotations = typing.get_type_hints(type(config))
  flags: list[str] = []
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    meta = field_metadata(type(config), f.name)
    if value == default and not meta.get("required"):
      continue
    if not meta.get("cli", True):
      raise ValueError(f"{f.name}={value!r} has no command-line flag")
    name = meta.get("flag", f.name.replace("_", "-"))
    base = _base_type(annotations[f.name])
    if base is bool:
      flags.append(f"--{name}" if value else f"--no-{name}")
    elif _is_mapping(base):
      for key, item in value.items():
        flags += [f"--{name}", f"{key}={json.dumps(item)}"]
    else:
      flags += [f"--{name}", str(value)]
  return flags


# The --workdir folders this process created (examples.training.settings.check_workdir): a run
# refused or interrupted before training removes them again if it left nothing in them but its lock
# files.
created_folders: list[pathlib.Path] = []


def _remove_unused_folders() -> None:
  for folder in created_folders:
    try:
      entries = list(folder.iterdir())
      unused = all(
        e.name.startswith(".lock-") or (e.is_dir() and not any(e.iterdir())) for e in entries
      )
    except OSError:
      continue
    if unused:
      shutil.rmtree(folder, ignore_errors=True)
  created_folders.clear()


INTERRUPTED_MESSAGE = "interrupted before training began; nothing was saved"


def _interrupted(signum: int, frame: Any) -> None:
  del signum, frame
  print(INTERRUPTED_MESSAGE, file=sys.stderr, flush=True)
  _remove_unused_folders()
  os._exit(EXIT_INTERRUPTED)


def end_on_ctrl_c() -> Any:
  """Makes Ctrl-C end the process at once with status 130 and one line (see
  :func:`_ctrl_c_ends_the_process`); returns the previous handler, or None where it cannot (not the
  main thread, or SIGINT ignored). A trainer's ``__main__`` calls it before it loads the libraries."""
  if (
    threading.current_thread() is not threading.main_thread()
    or signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  ):
    return None
  return signal.signal(signal.SIGINT, _interrupted)


@contextlib.contextmanager
def _ctrl_c_ends_the_process() -> Iterator[None]:
  """Until training begins (the loop's own handlers take over then), Ctrl-C ends the process at
  once with status 130: a KeyboardInterrupt raised inside XLA's compilation left its threads
  mid-way and crashed the process at exit (a segmentation fault), and one raised inside a garbage
  collector's callback was swallowed and the run went on. Nothing was saved yet, and the locks go
  with the process. Only in the main thread, and not when SIGINT is ignored (a job started with
  ``&``)."""
  previous = end_on_ctrl_c()
  try:
    yield
  finally:
    if previous is not None:
      signal.signal(signal.SIGINT, previous)


def run(
  main: Callable[[], Any], args: argparse.Namespace, expected: tuple[type[BaseException], ...] = ()
) -> int:
  """Runs ``main()``; a bad setting, missing data or a non-finite loss exits with a message, not a traceback.

  Args:
    main: the trainer's work (making its config included, so that a bad value is one line).
    args: the parsed flags (for the launch flags, :func:`initialize_distributed`).
    expected: further exception types to report as one line (e.g. the trainer's data error).

  Returns:
    The process exit status: :data:`EXIT_OK`, :data:`EXIT_USAGE` (2) for bad settings or data,
    a :class:`RunStopped`'s own (:data:`EXIT_NON_FINITE`, 3, for a non-finite loss or state;
    :data:`EXIT_PREEMPTED`, 4, for a signal), :data:`EXIT_INTERRUPTED` (130) for Ctrl-C before
    training. Any other exception propagates (Python exits with 1, :data:`EXIT_INTERNAL`).
  """
  try:
    with _ctrl_c_ends_the_process():
      initialize_distributed(args)
      main()
  except RunStopped as e:
    print(f"error: {e}" if e.exit_status == EXIT_NON_FINITE else str(e), file=sys.stderr)
    return e.exit_status
  except (ValueError, *expected) as e:
    print(f"error: {e}", file=sys.stderr)
    _remove_unused_folders()
    return EXIT_USAGE
  except KeyboardInterrupt:  # raised by code rather than by Ctrl-C (see _ctrl_c_ends_the_process)
    print(INTERRUPTED_MESSAGE, file=sys.stderr)
    _remove_unused_folders()
    return EXIT_INTERRUPTED
  except Exception:
    if "examples.peers" in sys.modules:  # a collective may have failed for a lost process
      sys.modules["examples.peers"].settle()
    raise
  finally:
    created_folders.clear()  # the next run in this process (a test's, a sweep's) starts afresh
  return EXIT_OK
