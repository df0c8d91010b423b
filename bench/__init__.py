"""Benchmarks of lowrank_kernels: ``python -m bench`` (see ``bench/__main__.py``).

Suites live in ``bench/bench_<family>.py`` and share one harness
(``bench/harness.py``: timing, row schema, roofline, CSV, table, plots).
"""
