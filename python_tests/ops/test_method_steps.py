"""The method-step list ops (``foreach_apollo_update_``, ``foreach_frugal_update_``,
``foreach_adafactor_update_``, ``foreach_gradnormlorp_update_``): every
backend (C++, Triton under the interpreter) against the reference on odd shapes, both sides,
the moment formats; clear errors with nothing written."""
import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import projection as proj_ops
from lowrank_kernels.ops import use_backend
from lowrank_kernels.reference import gradnormlorp as gnl_ref

from ..conftest import require_backend

SHAPES = [(13, 7), (6, 11), (9, 9)]


def _moments(low, bits, gen):
    """Moments of the low-rank shapes ``low`` in the format of ``bits`` (8-bit and 16-bit: zeros;
    32-bit: random from ``gen``) and the op's format keywords."""
    kw = {}
    if bits == 8:
        st = [ops.moments8_zeros(s, block_size=2) for s in low]
        ea, es = [d["exp_avg"] for d in st], [d["exp_avg_sq"] for d in st]
        kw = dict(m_absmax=[d["m_absmax"] for d in st], v_absmax=[d["v_absmax"] for d in st], block_size=2)
    elif bits == 16:
        ea = [torch.zeros(s, dtype=torch.bfloat16) for s in low]
        es = [torch.zeros(s, dtype=torch.bfloat16) for s in low]
        kw = dict(moment_seed=[5, 6, 7])
    else:
        ea = [0.1 * torch.randn(s, generator=gen) for s in low]
        es = [0.01 * torch.rand(s, generator=gen) for s in low]
    return ea, es, kw


def _apollo_args(side, channel, limiter, bits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = 3
    ps = [0.1 * torch.randn(s, generator=gen) for s in SHAPES]
    gs = [torch.randn(s, generator=gen) for s in SHAPES]
    low = [(m, r) if side == "right" else (r, n) for m, n in SHAPES]
    ea, es, kw = _moments(low, bits, gen)
    prev = [torch.tensor(0.5) for _ in SHAPES] if limiter else None
    seeds = [torch.tensor(s, dtype=torch.int64) for s in (3, 2**62 + 7, 11)]
    return ps, gs, seeds, ea, es, dict(side=side, rank=r, channel=channel, beta1=0.9, beta2=0.99, eps=1e-6,
                                       front=[1.0, 2.0, 1.0], alpha=[-1e-2, -2e-2, -3e-3], decay=[0.99, 1.0, 0.9],
                                       prev_norm=prev, **kw)


def _frugal_args(side, signsgd, bits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ranks = [3, 2, 9]  # the last is full rank: no residual
    ps = [0.1 * torch.randn(s, generator=gen) for s in SHAPES]
    gs = [torch.randn(s, generator=gen) for s in SHAPES]
    projs = []
    for (m, n), r in zip(SHAPES, ranks):
        k = n if side == "right" else m
        q = torch.linalg.qr(torch.randn(k, min(r, k), generator=gen)).Q
        projs.append(q.T.contiguous() if side == "right" else q.contiguous())
    low = [(m, p.shape[0]) if side == "right" else (p.shape[1], n) for (m, n), p in zip(SHAPES, projs)]
    ea, es, kw = _moments(low, bits, gen)
    return ps, gs, projs, ea, es, dict(side=side, signsgd=signsgd, beta1=0.9, beta2=0.99, eps=1e-8,
                                       alpha=[-1e-2, -2e-2, -3e-3], decay=[0.99, 1.0, 0.9],
                                       free_alpha=[-1e-3, -2e-3, 0.0], **kw)


def _adafactor_args(side, bits, scale_parameter, seed=0, shapes=SHAPES):
    """Odd shapes, ranks 3 / 2 / 9 (the last full rank), random factored statistics; ``bits``:
    None (no first moment) or the first moment's format."""
    gen = torch.Generator().manual_seed(seed)
    ranks = [3, 2, 9]
    ps = [0.1 * torch.randn(s, generator=gen) for s in shapes]
    gs = [torch.randn(s, generator=gen) for s in shapes]
    projs = []
    for (m, n), r in zip(shapes, ranks):
        k = n if side == "right" else m
        q = torch.linalg.qr(torch.randn(k, min(r, k), generator=gen)).Q
        projs.append(q.T.contiguous() if side == "right" else q.contiguous())
    low = [(m, p.shape[0]) if side == "right" else (p.shape[1], n) for (m, n), p in zip(shapes, projs)]
    rows = [0.1 * torch.rand(s[0], generator=gen) for s in low]
    cols = [0.1 * torch.rand(s[1], generator=gen) for s in low]
    kw = dict(side=side, eps1=1e-30, eps2=1e-3, clip_threshold=0.5, beta2t=[0.0, 0.5, 0.9], lr=[1e-2, 2e-2, 3e-3],
              weight_decay=[0.1, 0.0, 0.05], alpha=[-1.0, -0.25, -2.0], scale_parameter=scale_parameter)
    if bits is not None:
        kw["beta1"] = 0.9
        if bits == 8:
            st = [ops.moments8_zeros(s, block_size=2) for s in low]
            kw.update(exp_avg=[d["exp_avg"] for d in st], m_absmax=[d["m_absmax"] for d in st], block_size=2)
        elif bits == 16:
            kw.update(exp_avg=[torch.zeros(s, dtype=torch.bfloat16) for s in low], moment_seed=[5, 6, 7])
        else:
            kw["exp_avg"] = [0.01 * torch.randn(s, generator=gen) for s in low]
    return ps, gs, projs, rows, cols, kw
def _gradnormlorp_args(side, bits, eps=1e-6, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    ranks = [3, 2, 5]
    ps = [0.1 * torch.randn(s, generator=gen) for s in shapes]
    ps[0][4] = 0.0  # a zero row stays zero
    gs = [torch.randn(s, generator=gen) for s in shapes]
    projs = []
    for (m, n), r in zip(shapes, ranks):
        q = torch.linalg.qr(torch.randn(n if side == "right" else m, r, generator=gen)).Q
        projs.append(q.T.contiguous() if side == "right" else q.contiguous())
    low = [(m, r) if side == "right" else (r, n) for (m, n), r in zip(shapes, ranks)]
    ea, es, kw = _moments(low, bits, gen)
    norms = [p.norm(dim=1) for p in ps]
    wn_g = [-v * (1.0 + 0.5 * torch.rand(v.shape, generator=gen)) for v in norms]  # negative g, |g| != ||W||
    wn_vnorm = [v * (0.5 + torch.rand(v.shape, generator=gen)) for v in norms]
    m_g = [0.1 * torch.randn(v.shape, generator=gen) for v in norms]
    m_g[0][4] = 0.0  # a zero row's magnitude never moved (a = 0), so it has no momentum either
    v_g = [0.01 * torch.rand(v.shape, generator=gen) for v in norms]
    return ps, gs, projs, ea, es, wn_g, wn_vnorm, m_g, v_g, dict(
        side=side, beta1=0.9, beta2=0.99, eps=eps, step_size=[1e-2, 2e-2, 3e-3], scale=[0.25, 1.0, 2.0],
        decay=[0.99, 1.0, 0.9], **kw)


def _run(fn, make, backend):
    args = make()
    *tensors, kw = args
    with use_backend(backend):
        fn(*tensors, **kw)
    return args


def _close(a, b, what):
    for x, y in zip(a, b):
        if isinstance(x, list):
            _close(x, y, what)
        elif isinstance(x, torch.Tensor) and x.is_floating_point():
            torch.testing.assert_close(x.float(), y.float(), rtol=2e-5, atol=2e-6 if x.dtype == torch.float32 else 2e-2,
                                       msg=lambda m: f"{what}: {m}")
        elif isinstance(x, torch.Tensor):  # 8-bit codes: one code step at most
            assert (x.int() - y.int()).abs().max() <= 1, what


APOLLO_CASES = [("right", True, True, 32), ("left", True, False, 32), ("right", False, True, 32),
                ("left", False, True, 16), ("right", True, True, 8)]
GNL_CASES = [("right", 32, 1e-6), ("left", 32, 1e-6), ("right", 32, 0.0), ("left", 16, 1e-6), ("right", 8, 1e-6),
             ("left", 8, 0.0)]
FRUGAL_CASES = [("right", True, 32), ("left", True, 32), ("right", False, 32), ("left", True, 16), ("right", True, 8)]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("case", APOLLO_CASES, ids=[f"{s}-{'ch' if c else 't'}-{'lim' if l else 'free'}-{b}" for s, c, l, b in APOLLO_CASES])
def test_apollo_backends_match_reference(case, backend):
    require_backend("apollo_foreach_update", backend)
    want = _run(ops.foreach_apollo_update_, lambda: _apollo_args(*case), "reference")
    got = _run(ops.foreach_apollo_update_, lambda: _apollo_args(*case), backend)
    _close(list(got[:-1]) + [got[-1]["prev_norm"] or []], list(want[:-1]) + [want[-1]["prev_norm"] or []],
           f"apollo {case} {backend}")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("case", FRUGAL_CASES, ids=[f"{s}-{'sign' if g else 'sgd'}-{b}" for s, g, b in FRUGAL_CASES])
def test_frugal_backends_match_reference(case, backend):
    require_backend("frugal_foreach_update", backend)
    want = _run(ops.foreach_frugal_update_, lambda: _frugal_args(*case), "reference")
    got = _run(ops.foreach_frugal_update_, lambda: _frugal_args(*case), backend)
    _close(got[:-1], want[:-1], f"frugal {case} {backend}")


ADAFACTOR_CASES = [("right", None, False), ("left", None, True), ("right", 32, True), ("left", 32, False),
                   ("right", 16, False), ("left", 8, True)]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("case", ADAFACTOR_CASES,
                         ids=[f"{s}-{'nobeta1' if b is None else f'{b}bit'}-{'scaled' if sp else 'plain'}"
                              for s, b, sp in ADAFACTOR_CASES])
def test_adafactor_backends_match_reference(case, backend):
    require_backend("adafactor_foreach_update", backend)
    want = _run(ops.foreach_adafactor_update_, lambda: _adafactor_args(*case), "reference")
    got = _run(ops.foreach_adafactor_update_, lambda: _adafactor_args(*case), backend)
    extra = lambda a: [a[-1].get("exp_avg") or [], a[-1].get("m_absmax") or []]  # noqa: E731
    _close(list(got[:-1]) + extra(got), list(want[:-1]) + extra(want), f"adafactor {case} {backend}")


#: larger odd shapes (all under ATen's serial reduction size, 32768 elements): full 8-lane
#: vectors with tails, sums past the first cascade level (rows of 700, columns of 300), the
#: LLaMA-like 172 x 64 of the host-cost stack; the C++ kernels' raw-pointer paths run here.
BIG_SHAPES = [(172, 64), (40, 700), (300, 37)]


@pytest.mark.parametrize("shapes", [SHAPES, BIG_SHAPES], ids=["small", "big"])
def test_adafactor_cpp_is_bitwise_reference_on_cpu(shapes):
    """On CPU the C++ kernel repeats the reference's arithmetic: the same bits (the back-projection
    aside, whose C++ kernel the per-parameter optimizer step uses too: here both use it)."""
    require_backend("adafactor_foreach_update", "cpp")
    from lowrank_kernels.reference import adafactor as ref

    for case in ADAFACTOR_CASES:
        want = _adafactor_args(*case, shapes=shapes)
        got = _adafactor_args(*case, shapes=shapes)
        ps, gs, projs, rows, cols, kw = want
        kw = dict(kw)
        ref.adafactor_foreach_update_ref(
            ps, gs, projs, rows, cols, kw.get("exp_avg", []), kw.get("m_absmax", []), kw["side"], kw["eps1"],
            kw["eps2"], kw["clip_threshold"], kw.get("beta1", 0.0), kw["scale_parameter"], kw["beta2t"], kw["lr"],
            kw["weight_decay"], kw["alpha"], kw.get("block_size", 0), kw.get("moment_seed", []),
            backproject_apply=lambda p, u, pr, side, a, d: ops.backproject_apply_(p, u, pr, side=side, alpha=a,
                                                                                    decay=d))
        with use_backend("cpp"):
            ops.foreach_adafactor_update_(*got[:-1], **got[-1])
        for x, y in zip(list(got[:-1]) + [got[-1].get("exp_avg", [])], list(want[:-1]) + [kw.get("exp_avg", [])]):
            for a, b in zip(x, y):
                assert torch.equal(a, b), case


def test_adafactor_bad_entry_names_it_and_writes_nothing():
    ps, gs, projs, rows, cols, kw = _adafactor_args("right", 32, False)
    before = [p.clone() for p in ps] + [r.clone() for r in rows]
    cols[1] = cols[1][:1].clone()
    with pytest.raises(ValueError, match=r"foreach_adafactor_update_ \(entry 1\): exp_avg_sq_col must have shape"):
        ops.foreach_adafactor_update_(ps, gs, projs, rows, cols, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, ps + rows))
    ps, gs, projs, rows, cols, kw = _adafactor_args("right", 16, False)
    with pytest.raises(ValueError, match=r"\(entry 0\): a bfloat16 exp_avg needs moment_seed"):
        ops.foreach_adafactor_update_(ps, gs, projs, rows, cols, **{**kw, "moment_seed": [-1, 6, 7]})
    with pytest.raises(ValueError, match="clip_threshold must be > 0"):
        ops.foreach_adafactor_update_(ps, gs, projs, rows, cols, **{**kw, "clip_threshold": 0.0})
    with pytest.raises(ValueError, match="lr must have one entry per weight"):
        ops.foreach_adafactor_update_(ps, gs, projs, rows, cols, **{**kw, "lr": [1e-2]})
@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("case", GNL_CASES, ids=[f"{s}-{b}-eps{e}" for s, b, e in GNL_CASES])
def test_gradnormlorp_backends_match_reference(case, backend):
    require_backend("gradnormlorp_foreach_update", backend)
    want = _run(ops.foreach_gradnormlorp_update_, lambda: _gradnormlorp_args(*case), "reference")
    got = _run(ops.foreach_gradnormlorp_update_, lambda: _gradnormlorp_args(*case), backend)
    _close(got[:-1], want[:-1], f"gradnormlorp {case} {backend}")
    assert torch.equal(got[0][0][4], torch.zeros(SHAPES[0][1]))  # the zero row


@pytest.mark.parametrize("shapes", [SHAPES, BIG_SHAPES], ids=["small", "big"])
@pytest.mark.parametrize("case", GNL_CASES, ids=[f"{s}-{b}-eps{e}" for s, b, e in GNL_CASES])
def test_gradnormlorp_cpp_is_bitwise_the_per_parameter_step(case, shapes):
    """On CPU the C++ loop makes the per-parameter step's roundings exactly: the reference's loop
    calling the projection ops (C++ on CPU), as GradNormLoRPAdamW's per-parameter step does. (The
    projection family's reference kernels differ from its C++ ones by rounding, 8-bit moments
    most.)"""
    require_backend("gradnormlorp_foreach_update", "cpp")

    def per_parameter(*args, **kw):
        gnl_ref.gradnormlorp_foreach_update_ref(*args, **kw, project_adam=proj_ops.project_adam_op,
                                                backproject_apply=proj_ops.backproject_apply_op)

    *tensors, kw = want = _gradnormlorp_args(*case, shapes=shapes)
    with use_backend("cpp"):
        per_parameter(*tensors, kw.pop("side"), kw.pop("beta1"), kw.pop("beta2"), kw.pop("eps"), kw.pop("step_size"),
                      kw.pop("scale"), kw.pop("decay"), *proj_ops.foreach_moment_args(
                          "test", kw.pop("m_absmax", None), kw.pop("v_absmax", None), kw.pop("block_size", 256),
                          kw.pop("moment_seed", None)))
    assert not kw, kw
    got = _run(ops.foreach_gradnormlorp_update_, lambda: _gradnormlorp_args(*case, shapes=shapes), "cpp")
    for name, xs, ys in zip(("params", "grads", "projs", "exp_avg", "exp_avg_sq", "wn_g", "wn_vnorm", "exp_avg_g",
                             "exp_avg_sq_g"), got[:-1], want[:-1]):
        for i, (x, y) in enumerate(zip(xs, ys)):
            assert torch.equal(x, y), f"{case}: {name}[{i}] differs"


def test_gradnormlorp_bad_entry_names_it_and_writes_nothing():
    *tensors, kw = _gradnormlorp_args("right", 32)
    before = [t.clone() for xs in tensors for t in xs]
    tensors[6][1] = tensors[6][1][:3].clone()  # wn_vnorm of entry 1: wrong length
    with pytest.raises(ValueError, match=r"foreach_gradnormlorp_update_ \(entry 1\): wn_vnorm must have shape"):
        ops.foreach_gradnormlorp_update_(*tensors, **kw)
    tensors[6][1] = before[0].new_zeros(SHAPES[1][0])
    tensors[2][2] = tensors[2][2].double()
    with pytest.raises(TypeError, match=r"\(entry 2\): projs must have a floating dtype \(float32\)"):
        ops.foreach_gradnormlorp_update_(*tensors, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before[:3], tensors[0]))
    *tensors, kw = _gradnormlorp_args("left", 32)
    with pytest.raises(ValueError, match="decay must have one entry per weight"):
        ops.foreach_gradnormlorp_update_(*tensors, **{**kw, "decay": [1.0]})


def test_apollo_bad_entry_names_it_and_writes_nothing():
    ps, gs, seeds, ea, es, kw = _apollo_args("right", True, True, 32)
    before = [p.clone() for p in ps] + [m.clone() for m in ea]
    gs[2] = gs[2][:, :5]
    with pytest.raises(ValueError, match=r"foreach_apollo_update_ \(entry 2\).*grads"):
        ops.foreach_apollo_update_(ps, gs, seeds, ea, es, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, ps + ea))
    ps, gs, seeds, ea, es, kw = _apollo_args("right", True, True, 32)
    seeds[1] = torch.tensor(1.0)
    with pytest.raises(TypeError, match=r"\(entry 1\): seeds must be one-value int64 CPU tensors"):
        ops.foreach_apollo_update_(ps, gs, seeds, ea, es, **kw)
    with pytest.raises(ValueError, match="prev_norm must have one entry per weight"):
        ops.foreach_apollo_update_(ps, gs, seeds, ea, es, **{**kw, "prev_norm": kw["prev_norm"][:1]})


def test_frugal_bad_entry_names_it_and_writes_nothing():
    ps, gs, projs, ea, es, kw = _frugal_args("right", True, 32)
    before = [p.clone() for p in ps]
    projs[0] = projs[0][:, :4].contiguous()
    with pytest.raises(ValueError, match=r"foreach_frugal_update_ \(entry 0\): projs must be r x n"):
        ops.foreach_frugal_update_(ps, gs, projs, ea, es, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, ps))
    ps, gs, projs, ea, es, kw = _frugal_args("right", True, 32)
    with pytest.raises(TypeError, match=r"\(entry 1\): params must have a floating dtype \(float32\)"):
        ops.foreach_frugal_update_([ps[0], ps[1].double(), ps[2]], gs, projs, ea, es, **kw)


def _frugal_ref_with_cpp_backprojection(args):
    """The reference step with the back-projections of the C++ kernel the per-parameter
    optimizer step uses (``ops.backproject_apply_``), in place on ``args``."""
    from lowrank_kernels.reference import frugal as ref

    ps, gs, projs, ea, es, kw = args
    kw = dict(kw)
    for i, (p, g, proj) in enumerate(zip(ps, gs, projs)):
        low = g @ proj.T if kw["side"] == "right" else proj.T @ g
        upd = torch.float32 if ea[i].dtype == torch.uint8 else ea[i].dtype
        n_lr = ops.adam_update_(low.to(upd), ea[i], es[i], beta1=kw["beta1"], beta2=kw["beta2"], eps=kw["eps"],
                               **_moment_kw(kw, i))
        ref.frugal_apply_(p, g, proj, low, n_lr, kw["side"], kw["signsgd"], kw["alpha"][i], kw["decay"][i],
                          kw["free_alpha"][i],
                          lambda w, u, pr, side, a, d: ops.backproject_apply_(w, u, pr, side=side, alpha=a, decay=d))


def _moment_kw(kw, i):
    out = {}
    if kw.get("m_absmax"):
        out.update(m_absmax=kw["m_absmax"][i], v_absmax=kw["v_absmax"][i], block_size=kw["block_size"])
    if kw.get("moment_seed"):
        out["moment_seed"] = kw["moment_seed"][i]
    return out


def _frugal_llama_args(side, signsgd, seed=0):
    """FRUGAL's list op arguments on the LLaMA-layer shapes of the host-cost benchmark (rank 8)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 64), (172, 64), (64, 172)]
    ps = [0.02 * torch.randn(s, generator=gen) for s in shapes]
    gs = [torch.randn(s, generator=gen) for s in shapes]
    projs = []
    for m, n in shapes:
        q = torch.linalg.qr(torch.randn(n if side == "right" else m, 8, generator=gen)).Q
        projs.append(q.T.contiguous() if side == "right" else q.contiguous())
    low = [(m, 8) if side == "right" else (8, n) for m, n in shapes]
    ea = [0.1 * torch.randn(s, generator=gen) for s in low]
    es = [0.01 * torch.rand(s, generator=gen) for s in low]
    return ps, gs, projs, ea, es, dict(side=side, signsgd=signsgd, beta1=0.9, beta2=0.999, eps=1e-8,
                                       alpha=[-1e-3, -2e-3, -3e-3], decay=[1.0, 0.999, 1.0],
                                       free_alpha=[-1e-4, -2e-4, 0.0])


@pytest.mark.parametrize("case", FRUGAL_CASES + [("left", False, 32), ("llama-right", True, 32),
                                                 ("llama-left", True, 32), ("llama-left", False, 32)])
def test_frugal_cpp_is_bitwise_the_per_parameter_step(case):
    """On CPU the C++ list op (its GEMMs the BLAS calls torch's mm / addmm_ make, without the
    dispatcher) gives bit for bit what the per-parameter step computes: the projection by
    torch's matmul, the adam family's update, the back-projections by the projection
    family's C++ kernel, the state-free tail."""
    require_backend("frugal_foreach_update", "cpp")
    side, signsgd, bits = case

    def make():
        if side.startswith("llama"):
            return _frugal_llama_args(side.split("-")[1], signsgd)
        return _frugal_args(side, signsgd, bits)

    want, got = make(), make()
    _frugal_ref_with_cpp_backprojection(want)
    with use_backend("cpp"):
        ops.foreach_frugal_update_(*got[:-1], **got[-1])
    for x, y in zip(got[:-1], want[:-1]):
        for a, b in zip(x, y):
            assert torch.equal(a, b), case


def test_frugal_cpp_float32_step_makes_no_aten_call():
    """The float32 list op on the benchmark's shapes runs its GEMMs, Adam update and tails
    with no aten op (after the one-time checks of its GEMM layouts)."""
    require_backend("frugal_foreach_update", "cpp")
    cpp = torch.ops._lowrank_kernels.frugal_foreach_update_cpu
    for side in ("right", "left"):
        for signsgd in (True, False):
            ps, gs, projs, ea, es, kw = _frugal_llama_args(side, signsgd)
            kw["decay"] = [1.0, 1.0, 1.0]
            args = (ps, gs, projs, ea, es, side, signsgd, kw["beta1"], kw["beta2"], kw["eps"], kw["alpha"],
                    kw["decay"], kw["free_alpha"], [], [], 0, [])
            cpp(*args)  # the first call checks each GEMM layout against ATen's call once
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                cpp(*args)
            names = [e.name for e in prof.events() if e.name.startswith("aten::")]
            assert names == [], (side, signsgd, sorted(set(names)))


def _nested_aten(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("aten::")}


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX2",
                    reason="the raw-pointer reductions are checked against ATen's AVX2 kernels only")
def test_adafactor_and_gradnormlorp_cpp_take_the_raw_pointer_path():
    """Where ATen runs its AVX2 kernels, float32 entries of the sizes above step without ATen's
    reductions, element-wise ops or dispatched GEMMs (cpu/aten_order.h's self-check passed in this
    process); the bitwise tests above check the results."""
    require_backend("adafactor_foreach_update", "cpp")
    require_backend("gradnormlorp_foreach_update", "cpp")
    for side in ("right", "left"):
        *tensors, kw = _adafactor_args(side, 32, True, shapes=BIG_SHAPES)
        with use_backend("cpp"):
            seen = _nested_aten(lambda: ops.foreach_adafactor_update_(*tensors, **kw))
        assert not seen & {"aten::sum", "aten::mean", "aten::linalg_vector_norm", "aten::mm", "aten::item"}, seen
        *tensors, kw = _gradnormlorp_args(side, 32, shapes=BIG_SHAPES)
        with use_backend("cpp"):
            seen = _nested_aten(lambda: ops.foreach_gradnormlorp_update_(*tensors, **kw))
        assert not seen & {"aten::sum", "aten::mul", "aten::mul_", "aten::add_", "aten::addcmul_", "aten::mm",
                           "aten::empty"}, seen
