"""Benchmarks of padam_jax, run from the repository root (``python -m benchmarks.NAME``)."""
