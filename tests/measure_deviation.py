"""Prints padam's max relative deviation from the NumPy reference, per p and configuration.

    python tests/measure_deviation.py

The same measurement the reference-value tests assert on (``test_padam.py``), as a table.
"""

from __future__ import annotations


def main() -> None:
  from test_padam import P_VALUES, PadamReference, run_against_reference

  import padam_jax

  mask = {"a": True, "b": False, "c": True}
  print("| p | wd 0 | wd 5e-4 | wd 1e-2, masked | Algorithm 1 (eps 0, no bias correction) |")
  print("|---|---|---|---|---|")
  for p in P_VALUES:
    row = [
      run_against_reference(
        padam_jax.padam(0.1, p=p, weight_decay=wd),
        lambda wd=wd, p=p: PadamReference(p, wd=wd),
        lambda t: 0.1,
      )
      for wd in (0.0, 5e-4)
    ]
    row.append(
      run_against_reference(
        padam_jax.padam(0.1, p=p, weight_decay=1e-2, mask=mask),
        lambda p=p: PadamReference(p, wd=1e-2),
        lambda t: 0.1,
        mask=mask,
      )
    )
    cells = [f"{x:.2e}" for x in row]
    if p > 0:  # Algorithm 1 has p in (0, 1/2]
      cells.append(
        f"{run_against_reference(padam_jax.padam(0.01, p=p, eps=0.0, bias_correction=False), lambda p=p: PadamReference(p, eps=0.0, bias_correction=False), lambda t: 0.01):.2e}"
      )
    else:
      cells.append("-")
    print(f"| {p:.4g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  import pathlib
  import sys

  sys.path.insert(0, str(pathlib.Path(__file__).parent))
  main()
