"""Old public names kept for one release: they still work and warn (DeprecationWarning)."""
import warnings

import pytest

import lowrank_kernels.ops as ops
import lowrank_kernels.ops.projection as projection


@pytest.mark.parametrize("module", [ops, projection], ids=["ops", "ops.projection"])
def test_low_rank_shape_alias_warns_and_matches(module):
    with pytest.warns(DeprecationWarning, match="lowrank_shape"):
        old = module.low_rank_shape
    assert old is module.lowrank_shape
    assert old(8, 12, 3, "left") == (3, 12) and old(8, 12, 3, "right") == (8, 3)


def test_low_rank_shape_from_import_warns():
    with pytest.warns(DeprecationWarning):
        from lowrank_kernels.ops import low_rank_shape  # noqa: F401


def test_new_names_do_not_warn_and_unknown_names_raise():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.lowrank_shape(4, 6, 2, "left") == (2, 6)
    with pytest.raises(AttributeError, match="no_such_name"):
        ops.no_such_name  # noqa: B018


def test_bench_state_byte_counters_are_deprecated_aliases():
    """The benchmarks' own state counters now defer to lowrank_kernels.optim.state_nbytes."""
    import torch

    from bench import optimizers as bench_optimizers
    from bench.convergence import training
    from lowrank_kernels.optim import state_nbytes

    model = torch.nn.Linear(7, 5)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 7)).sum().backward()
    opt.step()
    for old in (bench_optimizers.state_bytes, training.state_bytes):
        with pytest.warns(DeprecationWarning, match="state_nbytes"):
            assert old(opt) == state_nbytes(opt)


def test_memory_planner_counters_are_the_registry_ones():
    from lowrank_kernels import memory
    from lowrank_kernels.optim import registry

    assert memory.state_nbytes is registry.state_nbytes
    assert memory.tensors_nbytes is registry.tensors_nbytes
    assert memory.optimizers_of is registry.optimizers_of
