"""The ops trace under torch.compile (fullgraph) through their fake impls, mutations included."""
import pytest
import torch

from lowrank_kernels import ops


def _inputs(m=40, n=24, r=5):
    g = torch.randn(m, n)
    p = torch.linalg.qr(torch.randn(n, r))[0].T.contiguous()
    return torch.randn(m, n), g, p, torch.zeros(m, r), torch.zeros(m, r)


def step(w, g, p, ea, eas, lr):
    ops.project_update_backproject_(w, g, p, ea, eas, side="right", lr=lr, step=1, weight_decay=0.1)
    n = ops.project_adam_(g, p, ea, eas, side="right")
    ops.backproject_apply_(w, n, p, side="right", alpha=-lr, decay=1.0)
    return n.sum()


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_projection_ops_compile_fullgraph(backend):
    torch._dynamo.reset()
    eager = _inputs()
    compiled = [t.clone() for t in eager]
    out_e = step(*eager, 0.01)
    out_c = torch.compile(step, backend=backend, fullgraph=True)(*compiled, 0.01)
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(compiled, eager):  # the in-place updates survive functionalization
        torch.testing.assert_close(a, b)


def test_dct_and_quant_ops_compile_fullgraph():
    torch._dynamo.reset()

    def f(g):
        idx = ops.dct_score_topk(g, 4, side="right")
        packed, scale, mn = ops.int4_pack(g.flatten(), 64)
        return idx, ops.int4_unpack(packed, scale, mn, g.shape, torch.float32, group_size=64)

    g = torch.randn(30, 20)
    (i_e, u_e), (i_c, u_c) = f(g), torch.compile(f, backend="aot_eager", fullgraph=True)(g)
    assert torch.equal(i_e, i_c)
    torch.testing.assert_close(u_c, u_e)
