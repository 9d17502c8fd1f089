"""What a compiled step runs, read from its HLO text: kernels, bytes, and operations per element.

:func:`hlo_summary` reads the text of a compiled step (``compiled.as_text()``).
"""

from __future__ import annotations

import math
import re

_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^=]*?\)|\S+)\s+([a-z][\w-]*)\((.*)$"
)
_ARRAY = re.compile(r"(pred|bf16|f16|f32|f64|s8|s32|s64|u8|u32|u64)\[([\d,]*)\]")
_ITEMSIZE = {
  "pred": 1,
  "bf16": 2,
  "f16": 2,
  "f32": 4,
  "f64": 8,
  "s8": 1,
  "s32": 4,
  "s64": 8,
  "u8": 1,
  "u32": 4,
  "u64": 8,
}
TRANSCENDENTALS = ("sqrt", "rsqrt", "divide", "power", "exponential", "log")


def shape_bytes(shape: str, min_elements: int = 2) -> int:
  """Bytes of the arrays in an HLO shape string; scalars and tiny arrays excluded."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    n = math.prod(int(d) for d in dims.split(",") if d)
    if n >= min_elements:
      total += n * _ITEMSIZE[dtype]
  return total


def hlo_summary(text: str) -> dict[str, float]:
  """Kernels in the entry computation, bytes they read and write, ops per element."""
  shapes: dict[str, str] = {}
  ops = dict.fromkeys(TRANSCENDENTALS, 0.0)
  kernels, read, written = 0, 0, 0
  in_entry = False
  for line in text.splitlines():
    if line.startswith("ENTRY"):
      in_entry = True
      continue
    if line.startswith("}"):
      in_entry = False
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode, rest = match.groups()
    shapes[name] = shape
    elements = sum(
      math.prod(int(d) for d in dims.split(",") if d) for _, dims in _ARRAY.findall(shape)
    )
    if opcode in ops and elements > 1:
      ops[opcode] += elements
    if in_entry and opcode not in (
      "parameter",
      "tuple",
      "get-tuple-element",
      "constant",
      "bitcast",
    ):
      out = shape_bytes(shape)
      if out:
        kernels += 1
        written += out
        operands = re.findall(r"%([\w.\-]+)", rest.split("),")[0])
        read += sum(shape_bytes(shapes.get(o, "")) for o in operands)
  return {"kernels": kernels, "read": read, "written": written, **ops}
