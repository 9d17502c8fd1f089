"""What a compiled step runs, read from its optimized HLO text: kernels, bytes, elementwise ops.

The text is ``compiled.as_text()`` of the executable that is timed
(:meth:`benchmarks.step_timing.JaxRunner.compiled`): the HLO after XLA's passes, fusions and
rewrites, so what it counts is what runs, not what was traced (a ``jnp.exp`` may be rewritten,
a polynomial holds none). :func:`hlo_summary` counts

- the kernels: the instructions of the entry computation, and of the bodies of its loops (a
  ``lax.fori_loop`` of steps has the step there), that produce an array, with the bytes they read
  and write;
- every elementwise operation of the kinds in :data:`OPS` (XLA's transcendental functions, and
  division) in every computation the entry calls, directly or not: instructions, and elements
  computed (an array's size; 1 for a scalar).
"""

from __future__ import annotations

import dataclasses
import math
import re

# XLA's elementwise transcendental opcodes (the HLO names: ``exponential-minus-one`` is
# ``jnp.expm1``, ``log-plus-one`` is ``jnp.log1p``), and division, in the order of the tables.
OPS = (
  "sqrt",
  "rsqrt",
  "cbrt",
  "divide",
  "power",
  "exponential",
  "exponential-minus-one",
  "log",
  "log-plus-one",
  "logistic",
  "tanh",
  "sine",
  "cosine",
  "tan",
  "atan2",
  "erf",
)

_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^=]*?\)|\S+)\s+([a-z][\w-]*)\((.*)$"
)
_COMMENT = re.compile(r"/\*.*?\*/")  # e.g. the ``/*index=5*/`` of a long tuple shape
_CALLED = re.compile(
  r"\b(calls|to_apply|body|condition|branch_computations|true_computation|false_computation"
  r"|called_computations)=(\{[^}]*\}|%?[\w.\-]+)"
)
_NAME = re.compile(r"%?([\w.\-]+)")
_ARRAY = re.compile(r"(pred|bf16|f16|f32|f64|s8|s16|s32|s64|u8|u16|u32|u64)\[([\d,]*)\]")
_ITEMSIZE = {
  "pred": 1,
  "bf16": 2,
  "f16": 2,
  "f32": 4,
  "f64": 8,
  "s8": 1,
  "s16": 2,
  "s32": 4,
  "s64": 8,
  "u8": 1,
  "u16": 2,
  "u32": 4,
  "u64": 8,
}
# Instructions that launch no kernel: they name, pack or unpack buffers, or hold control flow
# whose computations are counted themselves.
_NOT_KERNELS = ("parameter", "tuple", "get-tuple-element", "constant", "bitcast", "while")


@dataclasses.dataclass(frozen=True)
class HloSummary:
  """What a compiled step runs.

  Attributes:
    kernels: instructions producing an array in the entry computation and its loop bodies.
    read, written: the bytes those kernels read and write (arrays of 2 elements or more).
    instructions: per kind of :data:`OPS` found, its instructions, scalar ones included.
    elements: per kind of :data:`OPS` found, the elements those instructions compute.
  """

  kernels: int
  read: int
  written: int
  instructions: dict[str, int]
  elements: dict[str, int]


@dataclasses.dataclass(frozen=True)
class _Instruction:
  name: str
  shape: str
  opcode: str
  operands: str
  called: dict[str, tuple[str, ...]]  # attribute (calls, body, ...) -> computation names


def _elements(shape: str) -> int:
  return sum(math.prod(int(d) for d in dims.split(",") if d) for _, dims in _ARRAY.findall(shape))


def shape_bytes(shape: str, min_elements: int = 2) -> int:
  """Bytes of the arrays in an HLO shape string; scalars and tiny arrays excluded."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    n = math.prod(int(d) for d in dims.split(",") if d)
    if n >= min_elements:
      total += n * _ITEMSIZE[dtype]
  return total


def _instruction(line: str) -> _Instruction | None:
  match = _INSTRUCTION.match(_COMMENT.sub("", line))
  if not match:
    return None
  name, shape, opcode, rest = match.groups()
  called = {key: tuple(_NAME.findall(value)) for key, value in _CALLED.findall(rest)}
  return _Instruction(name, shape, opcode, rest.split("),")[0], called)


def parse(text: str) -> tuple[str, dict[str, list[_Instruction]]]:
  """The entry computation's name and every computation's instructions, by name."""
  computations: dict[str, list[_Instruction]] = {}
  entry, current = "", None
  for line in text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):  # a computation's header
      if line.startswith("HloModule"):
        continue
      is_entry = line.startswith("ENTRY")
      current = _NAME.match(line.removeprefix("ENTRY").strip()).group(1)
      computations[current] = []
      entry = current if is_entry else entry
    elif line.startswith("}"):
      current = None
    elif current is not None and (instruction := _instruction(line)) is not None:
      computations[current].append(instruction)
  return entry, computations


def _reached(
  computations: dict[str, list[_Instruction]], start: str, keys: tuple[str, ...] | None = None
) -> list[str]:
  """The computations ``start`` calls, directly or not, ``start`` first; only through the
  attributes in ``keys`` when given."""
  seen, todo = [start], [start]
  while todo:
    for instruction in computations.get(todo.pop(), []):
      for key, names in instruction.called.items():
        for name in names:
          if (keys is None or key in keys) and name in computations and name not in seen:
            seen.append(name)
            todo.append(name)
  return seen


def hlo_summary(text: str) -> HloSummary:
  """Kernels of the compiled step, the bytes they read and write, and its elementwise ops."""
  entry, computations = parse(text)
  instructions = dict.fromkeys(OPS, 0)
  elements = dict.fromkeys(OPS, 0)
  for name in _reached(computations, entry):
    for instruction in computations[name]:
      if instruction.opcode in instructions:
        instructions[instruction.opcode] += 1
        elements[instruction.opcode] += _elements(instruction.shape)
  kernels, read, written = 0, 0, 0
  for name in _reached(computations, entry, keys=("body",)):
    shapes = {i.name: i.shape for i in computations[name]}
    for instruction in computations[name]:
      out = shape_bytes(instruction.shape)
      if instruction.opcode in _NOT_KERNELS or not out:
        continue
      kernels += 1
      written += out
      operands = re.findall(r"%([\w.\-]+)", instruction.operands)
      read += sum(shape_bytes(shapes.get(o, "")) for o in operands)
  return HloSummary(
    kernels,
    read,
    written,
    {k: n for k, n in instructions.items() if n},
    {k: elements[k] for k, n in instructions.items() if n},
  )
