"""Multi-tensor function names: ``foreach_`` + the single-tensor function's name (as torch's
``_foreach_*``); the former names are deprecated aliases that warn and give the same result."""
import warnings

import pytest
import torch

from lowrank_kernels import ops


def test_multi_tensor_names_put_foreach_first():
    for new, single in (("foreach_adam_update_", "adam_update_"), ("foreach_dct_score_topk", "dct_score_topk"),
                        ("foreach_project_update_backproject_", "project_update_backproject_")):
        assert callable(getattr(ops, new)) and callable(getattr(ops, single))
        assert new in ops.__all__
    assert "adam_foreach_update_" not in ops.__all__ and "dct_foreach_score_topk" not in ops.__all__


def test_adam_foreach_update_alias_warns_and_matches():
    rs = [torch.randn(5, 3), torch.randn(2, 7)]
    ms = [0.1 * torch.randn(r.shape) for r in rs]
    vs = [0.1 * torch.rand(r.shape) for r in rs]
    m2, v2 = [m.clone() for m in ms], [v.clone() for v in vs]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name does not warn
        n_new = ops.foreach_adam_update_(rs, ms, vs, beta1=0.8, beta2=0.95, eps=1e-6)
    with pytest.warns(DeprecationWarning, match="use foreach_adam_update_"):
        n_old = ops.adam_foreach_update_(rs, m2, v2, beta1=0.8, beta2=0.95, eps=1e-6)
    for a, b in zip(n_new + ms + vs, n_old + m2 + v2):
        assert torch.equal(a, b)


def test_dct_foreach_score_topk_alias_warns_and_matches():
    gs = [torch.randn(6, 9), torch.randn(6, 9)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = ops.foreach_dct_score_topk(gs, 3, side="right", norm=2)
    with pytest.warns(DeprecationWarning, match="use foreach_dct_score_topk"):
        old = ops.dct_foreach_score_topk(gs, 3, side="right", norm=2)
    assert torch.equal(new, old)
    assert torch.equal(new[1], ops.dct_score_topk(gs[1], 3, side="right", norm=2))
