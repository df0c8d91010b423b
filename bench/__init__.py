"""Benchmarks of lowrank_kernels: ``python -m bench`` (see ``bench/__main__.py``).

Suites live in ``bench/bench_<family>.py`` and share one harness
(``bench/harness/``: sizes, rows, timing, context, report, plots) and one stamp helper
(``bench/stamps.py``: git describe with ``-dirty``, device name); the pre-training demo is
``bench/convergence/`` (``python -m bench.convergence``).
"""
