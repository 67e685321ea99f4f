"""Benchmarks of the core registry: ``python -m bench.core`` (``--quick`` for a smoke run).

Not part of the test suite; see :mod:`bench.core` for what is measured.
"""
