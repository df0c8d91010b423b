"""8-bit and 16-bit optimizer moments (``moment_bits``) in every optimizer.

- 200 GaLore steps of least squares (256 x 512, rank 32): 8-bit moments end within 5% of the
  float32 loss (the weight distance is printed);
- every optimizer (and its plain groups) trains with ``moment_bits=8`` and ``16``: loss
  goes down, nothing NaN, state in the format asked for;
- state bytes of the 8-bit low-rank moments, measured from the tensors:
  ``2 numel + 8 rows ceil(cols / 256)``; ``min_8bit_size`` respected;
- ``weights_only`` save/load and bit-identical resume (8 and 16 bits, across refreshes);
- bucketed == per-parameter (``foreach=False``) bit-identical with 8-bit and 16-bit moments;
- DCT ``moment_refresh="reindex"`` / ``"reset"`` on 8-bit moments; FRUGAL's reset;
- 16-bit stochastic rounding keeps the second moment decaying (round-to-nearest does not);
- load_state_dict converts between formats; bad keys give clear errors.
"""
import functools
import math
import warnings

import pytest
import torch
from torch import nn

from lowrank_kernels.optim import (
    APOLLOAdamW, DCTAdamW, FrugalAdamW, GaLoreAdafactor, GaLoreAdamW, GradNormLoRPAdamW, QGaLoreAdamW,
)
from lowrank_kernels.ops import use_backend
from lowrank_kernels.reference import moments as mref

from ..conftest import require_backend
from ._helpers import roundtrip

BACKENDS = ["reference", "cpp"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    require_backend("projection_project_update_backproject", request.param)
    require_backend("adam_update", request.param)
    return request.param


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def _groups(model, rank, **extra):
    """Projected 2-D weights, plain biases (rank None; FRUGAL also needs density None)."""
    ws = [p for n, p in model.named_parameters() if p.dim() == 2]
    bs = [p for n, p in model.named_parameters() if p.dim() != 2]
    return [{"params": ws, "rank": rank, **extra}, {"params": bs, "rank": None, "density": None}]


# name -> (constructor(groups, **kw), rank of the projected group)
MAKERS = {
    "galore": lambda g, **kw: GaLoreAdamW(g, lr=3e-2, update_proj_gap=10, **kw),
    "galore_full": lambda g, **kw: GaLoreAdamW(g, lr=3e-2, update_proj_gap=10, proj_type="full", **kw),
    "dct": lambda g, **kw: DCTAdamW(g, lr=3e-2, update_proj_gap=10, moment_refresh="reindex", **kw),
    "qgalore": lambda g, **kw: QGaLoreAdamW(g, lr=3e-2, update_proj_gap=10, **kw),
    "apollo": lambda g, **kw: APOLLOAdamW(g, lr=3e-2, update_proj_gap=10, **kw),
    "apollo_mini": lambda g, **kw: APOLLOAdamW.mini(g, lr=3e-2, update_proj_gap=10, **kw),
    "frugal": lambda g, **kw: FrugalAdamW(g, lr=3e-2, update_proj_gap=10, **kw),
    "gradnormlorp": lambda g, **kw: GradNormLoRPAdamW(g, lr=3e-2, update_proj_gap=10, **kw),
    "adafactor": lambda g, **kw: GaLoreAdafactor(g, lr=3e-2, relative_step=False, scale_parameter=False, beta1=0.9,
                                                update_proj_gap=10, **kw),
}


#: parameter dtype per moment format in the generic tests: 16-bit (bfloat16) moments are
#: exercised with bfloat16 parameters here and with float32 ones in
#: test_16bit_moments_float32_parameters_train_and_resume.
DTYPE = {32: torch.float32, 16: torch.bfloat16, 8: torch.float32}


class _Problem(nn.Module):
    """Least squares ``min ||x W1^T W2^T + b - y||^2`` on fixed data (small, odd shapes)."""

    def __init__(self, seed=0, dtype=torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter((torch.randn(40, 36, generator=gen) * 0.1).to(dtype))
        self.w2 = nn.Parameter((torch.randn(30, 40, generator=gen) * 0.1).to(dtype))
        self.b = nn.Parameter(torch.zeros(30, dtype=dtype))
        self.x = torch.randn(64, 36, generator=gen).to(dtype)
        self.y = (self.x.float() @ torch.randn(36, 30, generator=gen) * 0.3).to(dtype)

    def loss(self):
        return ((self.x @ self.w1.T @ self.w2.T + self.b - self.y).float() ** 2).mean()


def _train(name, steps, seed=0, dtype=torch.float32, **kw):
    model = _Problem(seed, dtype)
    opt = _quiet(MAKERS[name], _groups(model, 8), **kw)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model.loss()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    return model, opt, losses


@functools.lru_cache(maxsize=None)
def _ref_losses(name, dtype, backend):
    """The 32-bit run's losses (cached: shared by the 8-bit and 16-bit cases)."""
    with use_backend(backend):
        return tuple(_train(name, 30, dtype=dtype)[2])


def _moment_states(opt):
    return [(p, opt.state[p]) for g in opt.param_groups for p in g["params"] if "exp_avg" in opt.state.get(p, {})]


# --------------------------------------------------------------------------- validation
BAD = [
    (dict(moment_bits=7), "param group 0: moment_bits must be 32, 16 or 8"),
    (dict(moment_bits=True), "param group 0: moment_bits must be 32, 16 or 8"),
    (dict(moment_bits="8"), "param group 0: moment_bits must be 32, 16 or 8"),
    (dict(block_size=0), r"param group 0: block_size must be an int in \[1, 256\]"),
    (dict(block_size=257), r"param group 0: block_size must be an int in \[1, 256\]"),
    (dict(block_size=64.0), r"param group 0: block_size must be an int in \[1, 256\]"),
    (dict(min_8bit_size=-1), "param group 0: min_8bit_size must be an int >= 0"),
]


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("bad,msg", BAD)
def test_bad_moment_keys_raise(name, bad, msg):
    model = _Problem()
    with pytest.raises(ValueError, match=msg):
        _quiet(MAKERS[name], _groups(model, 8, **bad))


@pytest.mark.parametrize("name", ["galore", "dct", "apollo", "frugal", "qgalore"])
def test_moment_bits_needs_float32_moment_dtype(name):
    model = _Problem()
    with pytest.raises(ValueError, match=r"moment_bits=8 needs moment_dtype='float32'"):
        _quiet(MAKERS[name], _groups(model, 8, moment_bits=8, moment_dtype="param"))


def test_bad_group_added_later_changes_nothing():
    model = _Problem()
    opt = _quiet(GaLoreAdamW, [{"params": [model.w1], "rank": 4}], lr=1e-2)
    with pytest.raises(ValueError, match="param group 1: moment_bits must be 32, 16 or 8 .*got 4"):
        opt.add_param_group({"params": [model.w2], "rank": 4, "moment_bits": 4})
    assert len(opt.param_groups) == 1


# --------------------------------------------------------------------------- formats and training
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("name", list(MAKERS))
def test_every_optimizer_trains(name, bits, backend):
    """Loss decreases, no NaN, and every moment (projected and plain) is in the format asked
    for (min_8bit_size=0: these moments are small)."""
    with use_backend(backend):
        model, opt, losses = _train(name, 30, dtype=DTYPE[bits], moment_bits=bits, min_8bit_size=0)
    ref = _ref_losses(name, DTYPE[bits], backend)
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < 0.9 * losses[0], (losses[0], losses[-1])
    # at least 90% of the 32-bit run's progress (measured: 0.998 .. 1.03)
    assert losses[0] - losses[-1] >= 0.9 * (ref[0] - ref[-1]), (losses, ref)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    states = _moment_states(opt)
    assert states
    for p, st in states:
        m = st["exp_avg"]
        if bits == 8:
            assert m.dtype == torch.uint8, (name, tuple(p.shape))
            nb = -(-m.shape[-1] // 256)
            assert st["exp_avg_absmax"].dtype == torch.float32
            assert tuple(st["exp_avg_absmax"].shape) == tuple(m.shape[:-1]) + (nb,)
            assert torch.isfinite(st["exp_avg_absmax"]).all()
            if name != "adafactor":
                assert st["exp_avg_sq"].dtype == torch.uint8
                assert tuple(st["exp_avg_sq_absmax"].shape) == tuple(m.shape[:-1]) + (nb,)
        else:
            assert m.dtype == torch.bfloat16, (name, tuple(p.shape))
            if name != "adafactor":
                assert st["exp_avg_sq"].dtype == torch.bfloat16
    if name == "adafactor":  # its factored second moment stays float32
        for p, st in states:
            assert all(st[k].dtype == torch.float32 for k in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq")
                       if k in st)


def _least_squares(bits, steps=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(256, 512, generator=gen) / math.sqrt(512)
    x = torch.randn(512, 192, generator=gen)
    y = a @ x
    w = nn.Parameter(torch.zeros(256, 512))
    # 4 refreshes; the seeded randomized SVD keeps them cheap on a loaded CPU
    opt = _quiet(GaLoreAdamW, [{"params": [w], "rank": 32}], lr=5e-3, update_proj_gap=50, scale=1.0,
                 svd="lowrank", moment_bits=bits)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((w @ x - y) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = ((w @ x - y) ** 2).mean().item()
        first = (y ** 2).mean().item()
    return w.detach(), final, first, opt


@functools.lru_cache(maxsize=None)
def _least_squares_fp32(backend):
    with use_backend(backend):
        w, loss, first, _ = _least_squares(32)
    return w, loss, first


def test_galore_least_squares_8bit_within_5_percent(backend):
    """200 GaLore steps on 256 x 512 least squares (rank 32): the 8-bit final loss is within
    5% of the float32 one."""
    w32, loss32, first = _least_squares_fp32(backend)
    with use_backend(backend):
        w8, loss8, _, opt8 = _least_squares(8)
    st = opt8.state[opt8.param_groups[0]["params"][0]]
    assert st["exp_avg"].dtype == torch.uint8  # 32 x 512 = 16384 >= 4096 elements
    assert loss32 < 0.5 * first, (loss32, first)  # the run trains, so the comparison means something
    dist = ((w8 - w32).norm() / w32.norm()).item()
    print(f"\n[{backend}] least squares 256x512 rank 32, 200 steps: loss fp32 {loss32:.6g}, 8-bit {loss8:.6g} "
          f"(ratio {loss8 / loss32:.4f}); ||W8 - W32|| / ||W32|| = {dist:.4g}")
    assert abs(loss8 - loss32) <= 0.05 * loss32, (loss8, loss32)


@pytest.mark.parametrize("shape,rank,side", [((256, 512), 32, "left"), ((300, 200), 37, "right"),
                                             ((700, 300), 64, "right")])
def test_8bit_state_bytes(shape, rank, side):
    """Bytes of the low-rank moments, measured from the state tensors:
    2 numel + 8 rows ceil(cols / 256) (codes + float32 absmax), vs 8 numel in float32."""
    w = nn.Parameter(torch.randn(*shape))
    opt = _quiet(GaLoreAdamW, [{"params": [w], "rank": rank}], lr=1e-3, moment_bits=8)
    w.grad = torch.randn(*shape)
    opt.step()
    st = opt.state[w]
    keys = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")
    measured = sum(st[k].numel() * st[k].element_size() for k in keys)
    lr_shape = (shape[0], rank) if side == "right" else (rank, shape[1])
    assert tuple(st["exp_avg"].shape) == lr_shape
    rows, cols = lr_shape
    assert measured == 2 * rows * cols + 8 * rows * math.ceil(cols / 256)
    assert measured == mref.moments8_nbytes(lr_shape)
    assert measured < 0.3 * 8 * rows * cols


def test_min_8bit_size_respected():
    """Moments with fewer than min_8bit_size elements stay float32 (projected and plain)."""
    big = nn.Parameter(torch.randn(200, 64))     # rank 32, right: 200 x 32 = 6400 >= 4096 -> 8-bit
    small = nn.Parameter(torch.randn(100, 64))   # 100 x 32 = 3200 < 4096 -> float32
    vec = nn.Parameter(torch.randn(5000))        # plain, 5000 >= 4096 -> 8-bit
    bias = nn.Parameter(torch.randn(100))        # plain, small -> float32
    opt = _quiet(GaLoreAdamW, [{"params": [big, small], "rank": 32}, {"params": [vec, bias]}], lr=1e-3,
                 moment_bits=8)
    for p in (big, small, vec, bias):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[big]["exp_avg"].dtype == torch.uint8
    assert opt.state[small]["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in opt.state[small]
    assert opt.state[vec]["exp_avg"].dtype == torch.uint8
    assert tuple(opt.state[vec]["exp_avg_absmax"].shape) == (math.ceil(5000 / 256),)
    assert opt.state[bias]["exp_avg"].dtype == torch.float32
    # a group-level override
    opt2 = _quiet(GaLoreAdamW, [{"params": [small], "rank": 32, "min_8bit_size": 3200}], lr=1e-3, moment_bits=8)
    small.grad = torch.randn_like(small)
    opt2.step()
    assert opt2.state[small]["exp_avg"].dtype == torch.uint8


def test_16bit_moments_for_every_parameter_dtype():
    """moment_bits=16 stores bfloat16 moments for float32, float16 and bfloat16 parameters
    alike (float32 master weights are the usual mixed-precision setup)."""
    ps = {dt: nn.Parameter(torch.randn(40, 36).to(dt)) for dt in (torch.bfloat16, torch.float32, torch.float16)}
    plain = nn.Parameter(torch.randn(33))
    opt = _quiet(GaLoreAdamW, [{"params": list(ps.values()), "rank": 4}, {"params": [plain], "rank": None}],
                 lr=1e-3, moment_bits=16)
    for p in list(ps.values()) + [plain]:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in list(ps.values()) + [plain]:
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16, p.dtype
        assert opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16, p.dtype
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("name", ["galore", "dct", "apollo", "frugal"])
def test_16bit_moments_float32_parameters_train_and_resume(name, backend):
    """float32 parameters with moment_bits=16: bfloat16 moments (stochastic rounding), at
    least 90% of the float32-moment run's progress in 30 steps, and a torch.save/load resume
    after 6 of 12 steps is bit-identical to the uninterrupted run."""
    with use_backend(backend):
        model, opt, losses = _train(name, 30, dtype=torch.float32, moment_bits=16)
        ref = _ref_losses(name, torch.float32, backend)
        states = _moment_states(opt)
        assert states and all(st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16
                              for _, st in states)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(math.isfinite(v) for v in losses), losses
        assert losses[-1] < 0.9 * losses[0], (losses[0], losses[-1])
        assert losses[0] - losses[-1] >= 0.9 * (ref[0] - ref[-1]), (losses, ref)
        assert losses != list(ref)  # the moments really are rounded (not float32 in disguise)

        full_model, full_opt, _ = _train(name, 12, dtype=torch.float32, moment_bits=16)
        model = _Problem()
        opt = _quiet(MAKERS[name], _groups(model, 8), moment_bits=16)

        def steps(m, o, k):
            for _ in range(k):
                o.zero_grad()
                m.loss().backward()
                o.step()

        steps(model, opt, 6)
        saved = roundtrip(opt.state_dict())
        model2 = _Problem()
        model2.load_state_dict(model.state_dict())
        opt2 = _quiet(MAKERS[name], _groups(model2, 8), moment_bits=16)
        opt2.load_state_dict(saved)
        steps(model2, opt2, 6)
    for a, b in zip(full_model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(full_model.parameters(), model2.parameters()):
        _state_equal(full_opt.state[p], opt2.state[q])


# --------------------------------------------------------------------------- plain groups
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("foreach", [None, False])
def test_plain_group_close_to_torch_adamw(bits, foreach, backend):
    """A plain group with 8/16-bit moments follows torch.optim.AdamW (eps sqrt(1 - b2^t) in the op
    gives torch's eps convention): 20 steps stay within the quantization error."""
    gen = torch.Generator().manual_seed(3)
    dtype = DTYPE[bits]
    w0 = [torch.randn(64, 96, generator=gen).to(dtype), torch.randn(5000, generator=gen).to(dtype)]
    grads = [[torch.randn(w.shape, generator=gen).to(dtype) for w in w0] for _ in range(20)]
    ours = [nn.Parameter(w.clone()) for w in w0]
    ref = [nn.Parameter(w.clone()) for w in w0]
    # eps 1e-2: large enough that eps inside or outside the bias correction differ by far more
    # than the tolerance (checks the eps sqrt(1 - b2^t) passed to the op)
    opt = _quiet(GaLoreAdamW, ours, lr=1e-2, weight_decay=0.1, eps=1e-2, moment_bits=bits, min_8bit_size=0,
                 foreach=foreach)
    # 8-bit: torch.optim.AdamW itself; 16-bit (bfloat16 weights): our float32-moment AdamW, torch's
    # math with one rounding of the weight (torch's own bf16 AdamW keeps bf16 moments rounded to nearest)
    topt = (torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, eps=1e-2) if bits == 8 else
            _quiet(GaLoreAdamW, ref, lr=1e-2, weight_decay=0.1, eps=1e-2))
    with use_backend(backend):
        for gs in grads:
            for p, q, g in zip(ours, ref, gs):
                p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            topt.step()
    for p, q, w in zip(ours, ref, w0):
        want = torch.uint8 if bits == 8 else torch.bfloat16
        assert opt.state[p]["exp_avg"].dtype == want
        assert topt.state[q]["exp_avg"].dtype == torch.float32
        err = ((p.double() - q.double()).norm() / (q.double() - w.double()).norm()).item()
        assert err < 0.05, err


# --------------------------------------------------------------------------- 16-bit stochastic rounding
def test_16bit_sr_second_moment_keeps_decaying(backend):
    """bf16 round-to-nearest freezes ``0.999 v`` (it rounds back to v); the stochastic rounding
    of moment_bits=16 decays it as float32 does, in expectation."""
    n = 4096
    p = nn.Parameter(torch.zeros(n, dtype=torch.bfloat16))
    opt = _quiet(GaLoreAdamW, [p], lr=0.0, betas=(0.9, 0.999), moment_bits=16)
    gen = torch.Generator().manual_seed(5)
    g0 = (1.0 + torch.rand(n, generator=gen)).to(torch.bfloat16).float()
    steps = 300
    with use_backend(backend):
        for t in range(steps):
            p.grad = (g0 if t == 0 else torch.zeros(n)).to(torch.bfloat16)
            opt.step()
    v = opt.state[p]["exp_avg_sq"]
    assert v.dtype == torch.bfloat16
    expect = 0.001 * g0.square() * 0.999 ** (steps - 1)
    ratio = (v.double().sum() / expect.double().sum()).item()
    assert abs(ratio - 1.0) < 0.02, ratio
    # round to nearest would have stayed at the first value (the failure SR avoids)
    rtn = (0.001 * g0.square()).to(torch.bfloat16)
    for _ in range(steps - 1):
        rtn = (rtn.float() * 0.999).to(torch.bfloat16)
    assert (rtn.double().sum() / expect.double().sum()).item() > 1.2


def test_16bit_seeds_are_deterministic_and_vary():
    """Two identical runs give bit-identical bf16 moments; the seed differs per parameter and step."""
    a = _train("galore", 5, dtype=torch.bfloat16, moment_bits=16)[1]
    b = _train("galore", 5, dtype=torch.bfloat16, moment_bits=16)[1]
    for (_, sa), (_, sb) in zip(_moment_states(a), _moment_states(b)):
        assert sa["exp_avg_sq"].dtype == torch.bfloat16
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    p1, p2 = a.param_groups[0]["params"][:2]
    seeds = {a._moment_seed(p, t) for p in (p1, p2) for t in (1, 2, 3)}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)


# --------------------------------------------------------------------------- checkpoints
def _state_equal(sa, sb):
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
        else:
            assert sa[k] == sb[k], k


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("name", ["galore", "dct", "apollo", "frugal", "qgalore", "gradnormlorp", "adafactor"])
def test_weights_only_roundtrip_and_bit_identical_resume(name, bits):
    """12 steps uninterrupted == 6 steps, torch.save + torch.load(weights_only=True) into a fresh
    optimizer, 6 more steps (refreshes at 1 and 11): weights and state bit-identical."""
    full_model, full_opt, _ = _train(name, 12, dtype=DTYPE[bits], moment_bits=bits, min_8bit_size=0)
    model = _Problem(dtype=DTYPE[bits])
    opt = _quiet(MAKERS[name], _groups(model, 8), moment_bits=bits, min_8bit_size=0)

    def steps(m, o, k):
        for _ in range(k):
            o.zero_grad()
            m.loss().backward()
            o.step()

    steps(model, opt, 6)
    saved = roundtrip(opt.state_dict())
    assert any(isinstance(v, torch.Tensor) and v.dtype == (torch.uint8 if bits == 8 else torch.bfloat16)
               for st in saved["state"].values() for v in st.values())
    model2 = _Problem(dtype=DTYPE[bits])
    model2.load_state_dict(model.state_dict())
    opt2 = _quiet(MAKERS[name], _groups(model2, 8), moment_bits=bits, min_8bit_size=0)
    opt2.load_state_dict(saved)
    steps(model2, opt2, 6)
    for a, b in zip(full_model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(full_model.parameters(), model2.parameters()):
        _state_equal(full_opt.state[p], opt2.state[q])


def test_load_converts_between_formats():
    """float32 state into moment_bits=8 is quantized; 8-bit into 32 is dequantized exactly;
    into 16 rounded to bf16; an 8-bit state saved with another block_size is refused."""
    model, opt32, _ = _train("galore", 3, min_8bit_size=0)
    sd32 = roundtrip(opt32.state_dict())
    m2 = _Problem()
    opt8 = _quiet(MAKERS["galore"], _groups(m2, 8), moment_bits=8, min_8bit_size=0)
    opt8.load_state_dict(sd32)
    for (p, st32), (q, st8) in zip(_moment_states(opt32), _moment_states(opt8)):
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            codes, absmax = mref.moments_quantize_ref(st32[key], signed=signed)
            assert st8[key].dtype == torch.uint8 and torch.equal(st8[key], codes)
            assert torch.equal(st8[key + "_absmax"], absmax)
    sd8 = roundtrip(opt8.state_dict())
    m3 = _Problem()
    back = _quiet(MAKERS["galore"], _groups(m3, 8))
    back.load_state_dict(sd8)
    for (p, st8), (q, st) in zip(_moment_states(opt8), _moment_states(back)):
        assert st["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in st
        deq = mref.moments_dequantize_ref(st8["exp_avg"], st8["exp_avg_absmax"], signed=True)
        assert torch.equal(st["exp_avg"], deq)
    m4 = _Problem(dtype=torch.bfloat16)  # 16-bit moments: bfloat16 parameters
    o16 = _quiet(MAKERS["galore"], _groups(m4, 8), moment_bits=16)
    o16.load_state_dict(sd32)
    for (p, st32), (q, st) in zip(_moment_states(opt32), _moment_states(o16)):
        assert torch.equal(st["exp_avg_sq"], st32["exp_avg_sq"].to(torch.bfloat16))
    assert all(g["moment_bits"] == 32 for g in back.param_groups)  # this optimizer's format is kept
    # another block_size: requantized with this optimizer's
    m5 = _Problem()
    o4 = _quiet(MAKERS["galore"], _groups(m5, 8), moment_bits=8, min_8bit_size=0, block_size=4)
    o4.load_state_dict(sd8)
    for (p, st8), (q, st) in zip(_moment_states(opt8), _moment_states(o4)):
        deq = mref.moments_dequantize_ref(st8["exp_avg"], st8["exp_avg_absmax"], signed=True)
        codes, absmax = mref.moments_quantize_ref(deq, signed=True, block_size=4)
        assert torch.equal(st["exp_avg"], codes) and torch.equal(st["exp_avg_absmax"], absmax)
    assert all(g["block_size"] == 4 for g in o4.param_groups)
    # a corrupted checkpoint (absmax of the wrong shape) is refused before anything is loaded
    bad = roundtrip(opt8.state_dict())
    first = bad["param_groups"][0]["params"][0]
    bad["state"][first]["exp_avg_absmax"] = bad["state"][first]["exp_avg_absmax"][:, :0]
    m6 = _Problem()
    o6 = _quiet(MAKERS["galore"], _groups(m6, 8), moment_bits=8, min_8bit_size=0)
    with pytest.raises(ValueError, match=r"param group 0, parameter 0: the saved 8-bit exp_avg .* block_size 256"):
        o6.load_state_dict(bad)
    assert len(o6.state) == 0


# --------------------------------------------------------------------------- bucketed vs per parameter
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("cls", [GaLoreAdamW, DCTAdamW])
def test_bucketed_equals_per_parameter(cls, bits, backend):
    """The multi-tensor step with 8/16-bit moments (absmax lists / seed lists) is bit-identical
    to one op call per parameter, plain groups included."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(40, 36), (30, 40), (36, 40), (33, 70), (70, 33)]
    w0 = [torch.randn(s, generator=gen) for s in shapes] + [torch.randn(5000, generator=gen)]
    w0 = [w.to(DTYPE[bits]) for w in w0]
    grads = [[torch.randn(w.shape, generator=gen).to(w.dtype) for w in w0] for _ in range(8)]
    out = []
    for foreach in (None, False):
        ps = [nn.Parameter(w.clone()) for w in w0]
        kw = dict(moment_refresh="reindex") if cls is DCTAdamW else {}
        opt = _quiet(cls, [{"params": ps[:-1], "rank": 6}, {"params": ps[-1:]}], lr=1e-2, update_proj_gap=4,
                     moment_bits=bits, min_8bit_size=0, foreach=foreach, weight_decay=0.01, **kw)
        with use_backend(backend):
            for gs in grads:
                for p, g in zip(ps, gs):
                    p.grad = g.clone()
                opt.step()
        out.append((ps, opt))
    (a, oa), (b, ob) = out
    assert all(oa.state[p]["exp_avg"].dtype == (torch.uint8 if bits == 8 else torch.bfloat16) for p in a)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        _state_equal(oa.state[p], ob.state[q])


def test_bucketed_step_uses_one_call_per_format(monkeypatch):
    """Parameters with different moment formats never share a multi-tensor call."""
    from lowrank_kernels import ops

    calls = []
    real = ops.foreach_project_update_backproject_

    def spy(*a, **kw):
        calls.append((len(a[0]), "m_absmax" in kw and kw["m_absmax"] is not None))
        return real(*a, **kw)

    monkeypatch.setattr(ops, "foreach_project_update_backproject_", spy)
    big = [nn.Parameter(torch.randn(200, 64)) for _ in range(2)]    # 8-bit (200 x 16 >= 1000)
    small = [nn.Parameter(torch.randn(20, 64)) for _ in range(2)]   # 20 x 16 < 1000: float32
    opt = _quiet(GaLoreAdamW, [{"params": big + small, "rank": 16, "proj_type": "right"}], lr=1e-3,
                 moment_bits=8, min_8bit_size=1000)
    for _ in range(3):
        for p in big + small:
            p.grad = torch.randn_like(p)
        opt.step()
    assert sorted(calls) == sorted([(2, True), (2, False)] * 2), calls


# --------------------------------------------------------------------------- DCT and FRUGAL moment refresh
@pytest.mark.parametrize("side", ["left", "right"])
def test_dct_reindex_and_reset_8bit(side):
    """reindex: the kept basis vectors' moments move to their new positions (left: codes and
    absmax rows exactly; right: dequantize, move, requantize), new ones are zero; reset zeroes
    codes and absmax."""
    from lowrank_kernels.optim.dct import reindex_moments8_, reindex_moments_

    gen = torch.Generator().manual_seed(11)
    r, other, size = 6, 300, 40
    shape = (r, other) if side == "left" else (other, r)
    state = {}
    vals = {"exp_avg": torch.randn(shape, generator=gen), "exp_avg_sq": torch.rand(shape, generator=gen)}
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        state[key], state[key + "_absmax"] = mref.moments_quantize_ref(vals[key], signed=signed)
    before = {k: v.clone() for k, v in state.items()}
    old_idx = torch.tensor([3, 7, 1, 20, 11, 5], dtype=torch.int32)
    new_idx = torch.tensor([7, 2, 3, 30, 5, 9], dtype=torch.int32)
    reindex_moments8_(state, old_idx, new_idx, side, size, 256)
    deq = {k: mref.moments_dequantize_ref(before[k], before[k + "_absmax"], signed=(k == "exp_avg"))
           for k in ("exp_avg", "exp_avg_sq")}
    want = {k: v.clone() for k, v in deq.items()}
    reindex_moments_(want["exp_avg"], want["exp_avg_sq"], old_idx, new_idx, side, size)
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        got = mref.moments_dequantize_ref(state[key], state[key + "_absmax"], signed=signed)
        if side == "left":  # rows move whole with their absmax: exact
            assert torch.equal(got, want[key])
            moved = {k: before[k].float() for k in (key, key + "_absmax")}
            reindex_moments_(moved[key], moved[key + "_absmax"], old_idx, new_idx, side, size)
            assert torch.equal(state[key].float(), moved[key])
            assert torch.equal(state[key + "_absmax"], moved[key + "_absmax"])
        else:  # dequantized, moved, requantized
            codes, absmax = mref.moments_quantize_ref(want[key], signed=signed)
            assert torch.equal(state[key], codes) and torch.equal(state[key + "_absmax"], absmax)
            torch.testing.assert_close(got, want[key], rtol=0.1, atol=0.02 * want[key].abs().max().item())
    # new basis vectors (2, 30, 9: positions 1, 3, 5) hold zero
    sel = (slice(None), [1, 3, 5]) if side == "right" else ([1, 3, 5], slice(None))
    assert got[sel].abs().max() == 0

    # through the optimizer: reset zeroes codes and absmax at the refresh
    w = nn.Parameter(torch.randn(50, 300) if side == "left" else torch.randn(300, 50))
    opt = _quiet(DCTAdamW, [{"params": [w], "rank": 6}], lr=1e-3, update_proj_gap=2, moment_refresh="reset",
                 moment_bits=8, min_8bit_size=0)
    for t in range(2):
        w.grad = torch.randn(w.shape, generator=gen)
        opt.step()
    st = opt.state[w]
    assert st["exp_avg_absmax"].abs().sum() > 0
    seen = {}
    real = opt._zero_moments

    def spy(state, *a, **kw):
        real(state, *a, **kw)
        seen.update({k: state[k].clone() for k in ("exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax")})

    opt._zero_moments = spy
    w.grad = torch.randn(w.shape, generator=gen)
    opt.step()  # step 3 refreshes: reset, then the step's update
    assert all(int(v.abs().sum()) == 0 for v in seen.values()), {k: v.abs().sum() for k, v in seen.items()}


def test_frugal_subspace_change_zeroes_8bit_moments():
    w = nn.Parameter(torch.randn(80, 64))
    opt = _quiet(FrugalAdamW, [{"params": [w], "density": 0.25}], lr=1e-3, update_proj_gap=2, moment_bits=8,
                 min_8bit_size=0, projection="random")
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        w.grad = torch.randn(w.shape, generator=gen)
        opt.step()
    st = opt.state[w]
    assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg_absmax"].abs().sum() > 0
    saved = {k: st[k].clone() for k in ("exp_avg_absmax", "exp_avg_sq_absmax")}
    w.grad = torch.randn(w.shape, generator=gen)
    opt.step()  # a subspace change: the moments restart from zero, so m = (1 - b1) R
    r = opt.state[w]
    m = mref.moments_dequantize_ref(r["exp_avg"], r["exp_avg_absmax"], signed=True)
    from lowrank_kernels.optim.base import project_fp32

    want = 0.1 * project_fp32(w.grad, r["projector"], "right" if int(r["side"]) == 0 else "left")
    torch.testing.assert_close(m, want, rtol=0.05, atol=0.01 * want.abs().max().item())
    assert not torch.equal(saved["exp_avg_absmax"], r["exp_avg_absmax"])


def test_qgalore_int8_weights_with_8bit_moments():
    """Q-GaLore on INT8 QLinear weights (projected, and a plain QLinear group) with 8-bit
    moments: trains like its float32-moment run, moments uint8."""
    from lowrank_kernels.nn import quantize_linear_layers

    def run(bits):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 32))
        quantize_linear_layers(model, target_modules=("0", "2"), group_size=16)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(32, 64, generator=gen), torch.randn(32, 32, generator=gen)
        w1, w2 = model[0].weight, model[2].weight
        biases = [model[0].bias, model[2].bias]
        opt = _quiet(QGaLoreAdamW, [{"params": [w1], "rank": 8}, {"params": [w2]}, {"params": biases}],
                     lr=1e-2, update_proj_gap=10, moment_bits=bits, min_8bit_size=0)
        losses = []
        for _ in range(25):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            losses.append(loss.item())
            opt.step()
        return losses, opt, (w1, w2)

    l8, opt, (w1, w2) = run(8)
    l32, _, _ = run(32)
    assert opt.state[w1]["exp_avg"].dtype == torch.uint8 and opt.state[w2]["exp_avg"].dtype == torch.uint8
    assert all(math.isfinite(v) for v in l8)
    assert l8[0] - l8[-1] >= 0.9 * (l32[0] - l32[-1]) > 0, (l8, l32)


@pytest.mark.parametrize("bits", [8, 16])
def test_plain_group_compat_convention(bits):
    """compat="galore-torch" plain groups with 8/16-bit moments follow the packages' AdamW (eps
    before the bias correction, decay after the update), as the 32-bit compat path does."""
    dtype = DTYPE[bits]
    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(64, 80, generator=gen).to(dtype)
    grads = [torch.randn(64, 80, generator=gen).to(dtype) for _ in range(15)]
    out = []
    for b in (bits, 32):
        p = nn.Parameter(w0.clone())
        opt = _quiet(GaLoreAdamW, [p], lr=1e-2, eps=1e-2, weight_decay=0.1, compat="galore-torch", moment_bits=b,
                     min_8bit_size=0)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out.append(p.detach().double())
    err = ((out[0] - out[1]).norm() / (out[1] - w0.double()).norm()).item()
    assert err < 0.05, err
