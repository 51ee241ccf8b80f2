"""Benchmarks: runnable scripts that measure dropserver's speed and memory.

Not part of the product (the wheel leaves this package out). Each module is one
benchmark, run from the repository root as ``python -m benchmarks.<name>``; the
figures, exact commands, machine and date are in docs/benchmarks.md.
"""
