"""The op-counting dispatch mode of the tests.

One implementation, shared with the host-cost benchmark (``bench/host_cost.py``, which
must not import the tests): :class:`CountOps` counts the ops reaching the Python
dispatcher at the top level by qualified name (``mode.counts["aten._foreach_add_"]``,
``mode.total("lowrank_kernels")``); ``forbid=HOST_READS`` (or :func:`no_host_reads`)
makes any read of a tensor value into Python fail instead.

    with CountOps() as mode:
        opt.step()
    assert mode.counts.get("lowrank_kernels.projection_foreach_project_update_backproject") == 2
"""
from bench.host_cost import HOST_READS, CountOps

__all__ = ["CountOps", "HOST_READS", "no_host_reads"]


def no_host_reads() -> CountOps:
    """A :class:`CountOps` that fails on any read of a tensor value into Python
    (``.item()``, ``int(t)``, ``bool(t)``, ...): what a capturable step must not do."""
    return CountOps(forbid=HOST_READS)
