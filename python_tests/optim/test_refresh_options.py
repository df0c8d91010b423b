"""Refresh options of GaLoreAdamW and QGaLoreAdamW: ``refresh="svd" | "sample" | "random"``.

SARA (``"sample"``): ``r`` singular vectors drawn without replacement with probability
proportional to their singular values; GoLore (``"random"``): after ``random_after`` steps, a
uniformly random orthonormal projector. Both are seeded from ``refresh_seed``, the step and
the parameter's position, never from the global RNG.
"""
import pytest
import torch

from lowrank_kernels.optim import GaLoreAdamW, QGaLoreAdamW
from lowrank_kernels.optim import refresh as R

from ._helpers import grad_sequence


def _projectors(cls, shape, grads, **kw):
    """The projector after each step (dense, float32) of one parameter."""
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = cls([{"params": [p], "rank": kw.pop("rank", 4), "update_proj_gap": kw.pop("gap", 2), **kw}], lr=1e-3)
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        st = opt.state[p]
        if "projector_right" in st:
            out.append((st["projector"].clone(), st["projector_right"].clone()))
        else:
            out.append(opt._get_projector(p, st, opt.param_groups[0]) if "proj_packed" not in st
                       else st["proj_packed"].clone())
            out[-1] = out[-1].clone()
    return out, opt, p


def _eq(a, b):
    if isinstance(a, tuple):
        return all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("mode", ["sample", "random"])
@pytest.mark.parametrize("cls", [GaLoreAdamW, QGaLoreAdamW])
def test_same_seed_same_projector_and_no_global_rng(cls, mode):
    shape = (24, 16)
    grads = grad_sequence(shape, 6)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    a, _, _ = _projectors(cls, shape, grads, refresh=mode, refresh_seed=5)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is neither read nor advanced
    torch.manual_seed(999)  # another global state: same projectors
    b, _, _ = _projectors(cls, shape, grads, refresh=mode, refresh_seed=5)
    c, _, _ = _projectors(cls, shape, grads, refresh=mode, refresh_seed=6)
    assert all(_eq(x, y) for x, y in zip(a, b))
    assert not all(_eq(x, y) for x, y in zip(a, c))
    assert not _eq(a[2], a[4])  # each refresh draws anew


def test_parameters_draw_independently():
    g = grad_sequence((16, 16), 1)[0]
    ps = [torch.nn.Parameter(torch.zeros(16, 16)) for _ in range(2)]
    opt = GaLoreAdamW([{"params": ps, "rank": 4, "refresh": "random"}])
    for p in ps:
        p.grad = g.clone()
    opt.step()
    assert not torch.equal(opt.state[ps[0]]["projector"], opt.state[ps[1]]["projector"])


@pytest.mark.parametrize("mode", ["sample", "random"])
@pytest.mark.parametrize("side", ["right", "left", "full"])
def test_projectors_are_orthonormal(mode, side):
    shape = (24, 16)
    grads = grad_sequence(shape, 5)
    projs, _, _ = _projectors(GaLoreAdamW, shape, grads, refresh=mode, proj_type=side)
    eye = torch.eye(4)
    for proj in projs:
        u, vh = proj if side == "full" else ((proj, None) if side == "left" else (None, proj))
        if u is not None:
            torch.testing.assert_close(u.T @ u, eye, atol=1e-5, rtol=0)
        if vh is not None:
            torch.testing.assert_close(vh @ vh.T, eye, atol=1e-5, rtol=0)


def test_sampled_projector_is_a_set_of_singular_vectors():
    shape = (24, 16)
    g = grad_sequence(shape, 1)[0]
    projs, _, _ = _projectors(GaLoreAdamW, shape, [g], refresh="sample", proj_type="right")
    _, _, vh = torch.linalg.svd(g, full_matrices=False)
    cos = (projs[0] @ vh.T).abs()  # r x n: each row matches one singular vector
    assert torch.allclose(cos.max(dim=1).values, torch.ones(4), atol=1e-4)
    rows = cos.argmax(dim=1)
    assert rows.unique().numel() == 4 and torch.equal(rows, rows.sort().values)  # distinct, in SVD order


def test_sampling_prefers_large_singular_values():
    """Frequencies of the draws against the without-replacement rule: index i is drawn more
    often the larger s_i, and the top value's inclusion rate matches its exact probability."""
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    r, trials = 2, 4000
    counts = torch.zeros(6)
    for t in range(trials):
        idx = R.sample_indices(s, r, R.generator({"refresh_seed": 0}, t, 1, 0))
        assert idx.numel() == r and idx.unique().numel() == r
        counts[idx] += 1
    freq = counts / trials
    assert all(freq[i] > freq[i + 1] for i in range(5))
    w = s / s.sum()
    exact0 = w[0] + sum(w[j] * w[0] / (1 - w[j]) for j in range(1, 6))  # P(0 in a draw of 2)
    assert abs(freq[0] - exact0) < 0.03


def test_sampling_a_rank_deficient_gradient():
    s = torch.tensor([3.0, 1.0, 0.0, 0.0])
    assert torch.equal(R.sample_indices(s, 3, torch.Generator()), torch.arange(3))
    g = torch.zeros(12, 8)
    g[0, 0] = 1.0  # rank 1
    projs, _, _ = _projectors(GaLoreAdamW, (12, 8), [g], refresh="sample")
    assert torch.isfinite(projs[0]).all()


def test_golore_switches_after_random_after():
    shape = (24, 16)
    grads = grad_sequence(shape, 7)
    svd, _, _ = _projectors(GaLoreAdamW, shape, grads)
    gol, opt, p = _projectors(GaLoreAdamW, shape, grads, refresh="random", random_after=3, refresh_seed=9)
    # refreshes at steps 1, 3 (<= random_after) take the SVD, those at 5, 7 are random
    for t in (1, 2, 3, 4):
        assert torch.equal(gol[t - 1], svd[t - 1]), t
    for t in (5, 7):
        assert not torch.equal(gol[t - 1], svd[t - 1])
        want = R.random_projector(shape, 4, "right", opt.param_groups[0], t, opt._param_seed(p), device="cpu")
        assert torch.equal(gol[t - 1], want)


def test_qgalore_random_refresh_does_no_svd():
    shape = (32, 32)
    grads = grad_sequence(shape, 7)
    _, opt, _ = _projectors(QGaLoreAdamW, shape, grads, refresh="random", random_after=3, quant_group_size=16)
    assert opt.svd_count == 2  # steps 1 and 3; steps 5 and 7 draw at random
    _, opt, _ = _projectors(QGaLoreAdamW, shape, grads, refresh="sample", quant_group_size=16)
    assert opt.svd_count == 4


def test_refresh_svd_is_the_default_bitwise():
    shape = (24, 16)
    grads = grad_sequence(shape, 5)
    a, _, pa = _projectors(GaLoreAdamW, shape, grads)
    b, _, pb = _projectors(GaLoreAdamW, shape, grads, refresh="svd", refresh_seed=3, random_after=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and torch.equal(pa, pb)


@pytest.mark.parametrize("cls", [GaLoreAdamW, QGaLoreAdamW])
def test_bad_values_name_the_parameter(cls):
    p = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match="refresh must be one of 'svd', 'sample', 'random', got 'topk'"):
        cls([p], rank=2, refresh="topk")
    with pytest.raises(ValueError, match="random_after must be an int >= 0.*got -1"):
        cls([p], rank=2, refresh="random", random_after=-1)
    with pytest.raises(ValueError, match="refresh_seed must be an int, got 1.5"):
        cls([p], rank=2, refresh="sample", refresh_seed=1.5)
    with pytest.raises(ValueError, match="param group 0.*refresh must be"):
        cls([{"params": [p], "rank": 2, "refresh": None}])
