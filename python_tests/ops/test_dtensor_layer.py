"""The DTensor op handlers live on the op layer: importing the ops imports no optimizer, and
the optimizers' distributed module re-exports the handlers' public names."""
import subprocess
import sys


def test_ops_import_no_optimizer_module():
    code = ("import sys, lowrank_kernels.ops, lowrank_kernels.ops.dtensor; "
            "bad = [m for m in sys.modules if m.startswith('lowrank_kernels.optim') "
            "or m.startswith('lowrank_kernels.integrations')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_optim_distributed_reexports_the_op_layer():
    from lowrank_kernels.ops import dtensor
    from lowrank_kernels.optim import distributed

    for name in ("install_op_handlers", "sharded_project", "ShardingError", "is_dtensor", "is_row_sharded",
                 "local_rows"):
        assert getattr(distributed, name) is getattr(dtensor, name), name
    assert distributed.install_op_handlers.__module__ == "lowrank_kernels.ops.dtensor"
