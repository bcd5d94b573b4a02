"""Benchmark harness for singd_functional: ``python -m benchmarks.run [--quick]``.

See ``benchmarks/README.md`` for what is measured and how to read the results.
"""
