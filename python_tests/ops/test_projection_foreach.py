"""The multi-tensor forms: ``projection_foreach_project_update_backproject`` and
``adam_foreach_update``, one op call for a list of parameters, on every backend: equal to
the single-tensor ops run one by one; every entry validated before any is written;
torch.compile traces them."""
import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops import _registry as reg
from lowrank_kernels.ops import use_backend

from .._numerics import assert_change_close, assert_matches_backend
from ..conftest import require_backend
from .test_projection_kinds import make_projector

SHAPES = [(37, 23, 5), (19, 41, 1), (16, 16, 16), (64, 9, 3)]

# A direct call of a C++ kernel's op with bad input fails a bare TORCH_CHECK (the op layer's
# validators, which run before every routed call, have the messages).
BARE_CHECK = "to be true, but got false"


@pytest.fixture(params=reg.BACKENDS)
def backend(request):
    name = request.param
    require_backend("projection_foreach_project_update_backproject", name)
    return name


def _bucket(kind, side, dtype):
    params, grads, projs, eas, easqs = [], [], [], [], []
    for m, n, r in SHAPES:
        proj, _ = make_projector(kind, m, n, r, side, dtype)
        ls = ops.lowrank_shape(m, n, r, side)
        params.append(torch.randn(m, n, dtype=dtype))
        grads.append(torch.randn(m, n, dtype=dtype))
        projs.append(proj)
        eas.append(0.1 * torch.randn(ls))
        easqs.append(0.1 * torch.rand(ls))
    return params, grads, projs, eas, easqs


def _clone(xs):
    return [x.clone() for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["dense", "dct", "int4"])
def test_foreach_step_equals_single_steps(backend, kind, side, dtype):
    params, grads, projs, eas, easqs = _bucket(kind, side, dtype)
    lrs, steps, wds, scales = [0.01, 0.02, 0.005, 0.03], [1, 5, 2, 9], [0.0, 2.0, 4.0, 0.0], [1.0, 0.25, 0.5, 2.0]
    p1, e1, v1 = _clone(params), _clone(eas), _clone(easqs)
    with use_backend("reference"):
        for i in range(len(params)):
            ops.project_update_backproject_(p1[i], grads[i], projs[i], e1[i], v1[i], side=side, lr=lrs[i],
                                            beta1=0.8, beta2=0.95, eps=1e-7, step=steps[i],
                                            weight_decay=wds[i], scale=scales[i])
    p2, e2, v2 = _clone(params), _clone(eas), _clone(easqs)
    with use_backend(backend):
        ops.foreach_project_update_backproject_(p2, grads, projs, e2, v2, side=side, lr=lrs, beta1=0.8, beta2=0.95,
                                                eps=1e-7, step=steps, weight_decay=wds, scale=scales)
    for i in range(len(params)):
        assert_change_close(p2[i], params[i], p1[i], f"param {i}")  # the change, not W
        assert_matches_backend(e2[i], e1[i], f"exp_avg {i}")
        assert_matches_backend(v2[i], v1[i], f"exp_avg_sq {i}")


def test_foreach_scalar_hyperparameters_broadcast(backend):
    params, grads, projs, eas, easqs = _bucket("dense", "right", torch.float32)
    p1, e1, v1 = _clone(params), _clone(eas), _clone(easqs)
    p2, e2, v2 = _clone(params), _clone(eas), _clone(easqs)
    with use_backend(backend):
        for i in range(len(params)):
            ops.project_update_backproject_(p1[i], grads[i], projs[i], e1[i], v1[i], side="right", lr=0.01, step=3,
                                            weight_decay=0.1)
        ops.foreach_project_update_backproject_(p2, grads, projs, e2, v2, side="right", lr=0.01, step=3,
                                                weight_decay=0.1)
    for a, b in zip(p1 + e1 + v1, p2 + e2 + v2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same kernels on the same numbers


def test_foreach_empty_list(backend):
    with use_backend(backend):
        ops.foreach_project_update_backproject_([], [], [], [], [], side="right", lr=0.1, step=1)
        assert ops.foreach_adam_update_([], [], []) == []


# --------------------------------------------------------------------------- validation before any write
def _bad_foreach_cases():
    params, grads, projs, eas, easqs = _bucket("dense", "right", torch.float32)
    base = dict(params=params, grads=grads, projs=projs, exp_avgs=eas, exp_avg_sqs=easqs, side="right", lr=0.1, step=1)
    bad_grads = list(grads)
    bad_grads[3] = grads[3].long()
    yield "last entry bad", dict(base, grads=bad_grads), TypeError, r"\(parameter 3\): grad must have a floating dtype"
    yield "short list", dict(base, grads=grads[:3]), ValueError, r"grads must have one entry per parameter \(4\)"
    yield "short lr list", dict(base, lr=[0.1, 0.1]), ValueError, r"lr must have one entry per parameter \(4\)"
    yield "bad step", dict(base, step=[1, 1, 0, 1]), ValueError, r"\(parameter 2\): step must be >= 1"
    yield "same param twice", dict(base, params=[params[0], params[1], params[2], params[0]],
                                   grads=[grads[0], grads[1], grads[2], grads[0]],
                                   projs=[projs[0], projs[1], projs[2], projs[0]],
                                   exp_avgs=[eas[0], eas[1], eas[2], eas[0].clone()],
                                   exp_avg_sqs=[easqs[0], easqs[1], easqs[2], easqs[0].clone()]), \
        ValueError, r"params\[0\] and params\[3\] share memory"
    mixed = list(projs)
    mixed[1] = ops.DCTProjector(ops.dct_basis(41), torch.tensor([0]))
    yield "mixed kinds", dict(base, projs=mixed), TypeError, "projs must all be of one kind"


@pytest.mark.parametrize("case", [c[0] for c in _bad_foreach_cases()])
def test_foreach_bad_input_changes_nothing(backend, case):
    _, kw, exc, msg = next(c for c in _bad_foreach_cases() if c[0] == case)
    tensors = [t for k in ("params", "exp_avgs", "exp_avg_sqs") for t in kw[k]]
    snap = [t.clone() for t in tensors]
    with use_backend(backend), pytest.raises(exc, match=msg):
        ops.foreach_project_update_backproject_(
            kw.pop("params"), kw.pop("grads"), kw.pop("projs"), kw.pop("exp_avgs"), kw.pop("exp_avg_sqs"), **kw)
    assert all(torch.equal(a, b) for a, b in zip(tensors, snap))


def test_adam_foreach_equals_single(backend):
    rs = [torch.randn(7, 3), torch.randn(30, 11).to(torch.bfloat16), torch.randn(1, 1)]
    ms = [0.1 * torch.randn(r.shape) for r in rs]
    vs = [0.1 * torch.rand(r.shape) for r in rs]
    m1, v1, m2, v2 = _clone(ms), _clone(vs), _clone(ms), _clone(vs)
    with use_backend(backend):
        n1 = [ops.adam_update_(r, m, v, beta1=0.7, beta2=0.9, eps=1e-6) for r, m, v in zip(rs, m1, v1)]
        n2 = ops.foreach_adam_update_(rs, m2, v2, beta1=0.7, beta2=0.9, eps=1e-6)
    for a, b in zip(n1 + m1 + v1, n2 + m2 + v2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_adam_foreach_bad_entry_changes_nothing(backend):
    rs = [torch.randn(4, 3), torch.randn(5, 2)]
    ms, vs = [torch.zeros(4, 3), torch.zeros(5, 3)], [torch.zeros(4, 3), torch.zeros(5, 2)]
    with use_backend(backend), pytest.raises(ValueError, match=r"\(entry 1\): exp_avg must have shape \(5, 2\)"):
        ops.foreach_adam_update_(rs, ms, vs)
    with use_backend(backend), pytest.raises(ValueError, match=r"exp_avg\[0\] and exp_avg_sq\[1\] share memory"):
        ops.foreach_adam_update_([rs[0], rs[0]], [ms[0], torch.zeros(4, 3)], [vs[0], ms[0]])
    assert not any(t.any() for t in ms + vs)


def test_cpp_foreach_checks_every_entry_first():
    if not reg.extension_loaded():
        pytest.skip("extension not built (test_package asserts it is where make test ran)")
    params, grads, projs, eas, easqs = _bucket("dense", "right", torch.float32)
    snap = [t.clone() for t in params + eas + easqs]
    bad = list(grads)
    bad[2] = torch.randn(3, 3)
    OPS = torch.ops._lowrank_kernels
    n = len(params)
    with pytest.raises(RuntimeError, match=BARE_CHECK):
        OPS.projection_foreach_project_update_backproject_cpu(params, bad, projs, eas, easqs, "right", [0.1] * n, 0.9,
                                                              0.99, 1e-8, [1] * n, [0.0] * n, [1.0] * n, [], [], [], [], 0,
                                                              [], [], 0, [])
    with pytest.raises(RuntimeError, match=BARE_CHECK):
        OPS.projection_foreach_project_update_backproject_cpu(params, grads, projs, eas, easqs, "right", [0.1], 0.9,
                                                              0.99, 1e-8, [1] * n, [0.0] * n, [1.0] * n, [], [], [], [], 0,
                                                              [], [], 0, [])
    assert all(torch.equal(a, b) for a, b in zip(params + eas + easqs, snap))


# --------------------------------------------------------------------------- compile
def test_foreach_ops_compile_fullgraph():
    torch._dynamo.reset()

    def step(params, grads, projs, eas, easqs, rs, ms, vs):
        ops.foreach_project_update_backproject_(params, grads, projs, eas, easqs, side="right", lr=[0.01, 0.02],
                                                step=[1, 2], weight_decay=0.1)
        ns = ops.foreach_adam_update_(rs, ms, vs)
        return ns[0].sum() + ns[1].sum()

    def inputs():
        g = torch.Generator().manual_seed(0)
        shapes = [(12, 7, 3), (9, 10, 2)]
        params = [torch.randn(m, n, generator=g) for m, n, _ in shapes]
        grads = [torch.randn(m, n, generator=g) for m, n, _ in shapes]
        projs = [torch.randn(r, n, generator=g) for _, n, r in shapes]
        eas = [torch.zeros(m, r) for m, _, r in shapes]
        easqs = [torch.zeros(m, r) for m, _, r in shapes]
        rs = [torch.randn(4, 3, generator=g), torch.randn(2, 2, generator=g)]
        ms, vs = [torch.zeros(4, 3), torch.zeros(2, 2)], [torch.zeros(4, 3), torch.zeros(2, 2)]
        return params, grads, projs, eas, easqs, rs, ms, vs

    eager, compiled = inputs(), inputs()
    out_e = step(*eager)
    out_c = torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled)
    torch.testing.assert_close(out_c, out_e)
    for a_list, b_list in zip(compiled, eager):  # the in-place updates survive functionalization
        for a, b in zip(a_list, b_list):
            torch.testing.assert_close(a, b)
