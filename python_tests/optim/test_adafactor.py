"""GaLoreAdafactor: parity with galore-torch's GaLoreAdafactor, state, checkpoints, errors."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

from lowrank_kernels.optim import GaLoreAdafactor

from ._helpers import roundtrip

galore_torch = pytest.importorskip("galore_torch")

VOCAB, DIM, HID = 50, 24, 40


class Net(nn.Module):
    """A small model: two projected weights (one tall, one wide) and plain 2-D / 1-D params."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.attn = nn.Linear(DIM, HID, bias=False)  # 40 x 24
        self.mlp = nn.Linear(HID, DIM)  # 24 x 40
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids):
        x = self.emb(ids)
        x = self.norm(x + self.mlp(torch.tanh(self.attn(x))))
        logits = self.head(x)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def make_model(seed=0):
    torch.manual_seed(seed)
    return Net()


def groups(model, rank, gap, proj_type, scale=0.25):
    lowrank = [model.attn.weight, model.mlp.weight]
    plain = [p for p in model.parameters() if all(p is not q for q in lowrank)]
    return [
        {"params": lowrank, "rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": proj_type},
        {"params": plain},
    ]


def batches(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, 12), generator=gen) for _ in range(steps)]


def train(model, opt, data):
    for ids in data:
        opt.zero_grad(set_to_none=True)
        model(ids).backward()
        opt.step()
    return model


OPTIONS = [
    dict(),  # galore-torch defaults: relative step, parameter scaling, no beta1
    dict(lr=1e-2, relative_step=False, scale_parameter=False),  # HF Trainer's settings
    dict(lr=5e-3, relative_step=False, scale_parameter=True, beta1=0.9, weight_decay=0.05),
    dict(relative_step=True, scale_parameter=False, beta1=0.9, weight_decay=0.1),
    dict(lr=1e-2, relative_step=False, scale_parameter=False, weight_decay=0.05, clip_threshold=0.5),
    dict(relative_step=True, warmup_init=True, decay_rate=-0.5, eps=(1e-20, 1e-2)),
]


def _parity(options, proj_type, rank=4, gap=3, steps=12):
    ours_model, ref_model = make_model(), make_model()
    data = batches(steps)
    ours = GaLoreAdafactor(groups(ours_model, rank, gap, proj_type), **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = galore_torch.GaLoreAdafactor(groups(ref_model, rank, gap, proj_type), **options)
    w0 = copy.deepcopy(ref_model)
    train(ours_model, ours, data)
    train(ref_model, ref, data)
    for (name, a), b, c in zip(ours_model.named_parameters(), ref_model.parameters(), w0.parameters()):
        assert not torch.equal(b, c), f"{name} did not move"
        # the weights, elementwise, to 1e-5 relative (float32)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        # and, more sensitive to a wrong factor, the change of the weights to 1e-4 of its largest
        # element (float32 rounding of W itself is ~1e-5 of the change here)
        change = (b - c).abs().max().item()
        err = ((a - c) - (b - c)).abs().max().item()
        assert err <= 1e-4 * change, f"{name}: change differs by {err / change:.2e} of its size"
    return ours


@pytest.mark.parametrize("options", OPTIONS, ids=[",".join(f"{k}={v}" for k, v in o.items()) or "defaults"
                                                  for o in OPTIONS])
def test_parity_with_galore_torch(options):
    _parity(options, "std")


@pytest.mark.parametrize("proj_type", ["reverse_std", "left", "right", "full"])
def test_parity_with_galore_torch_proj_types(proj_type):
    _parity(dict(lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9, weight_decay=0.1), proj_type)


def test_refreshes_happen_on_schedule():
    model = make_model()
    opt = GaLoreAdafactor(groups(model, 4, 3, "std"))
    seen = []
    for t, ids in enumerate(batches(7), start=1):
        opt.zero_grad()
        model(ids).backward()
        before = opt.state[model.attn.weight].get("projector")
        before = None if before is None else before.clone()
        opt.step()
        after = opt.state[model.attn.weight]["projector"]
        seen.append(before is None or not torch.equal(before, after))
    assert seen == [True, False, False, True, False, False, True]


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_state_bytes(beta1):
    model = make_model()
    rank = 4
    opt = GaLoreAdafactor(groups(model, rank, 3, "std"), beta1=beta1)
    train(model, opt, batches(2))
    # attn.weight 40 x 24 (std: right, R is 40 x r); mlp.weight 24 x 40 (std: left, R is r x 40)
    for p, (rows, cols) in ((model.attn.weight, (HID, rank)), (model.mlp.weight, (rank, HID))):
        st = opt.state[p]
        moments = {k: v for k, v in st.items() if k.startswith("exp_avg")}
        expected = {"exp_avg_sq_row": (rows,), "exp_avg_sq_col": (cols,)}
        if beta1 is not None:
            expected["exp_avg"] = (rows, cols)
        assert {k: tuple(v.shape) for k, v in moments.items()} == expected
        assert all(v.dtype == torch.float32 for v in moments.values())
        nbytes = sum(v.numel() * v.element_size() for v in moments.values())
        assert nbytes == 4 * (rows + cols + (rows * cols if beta1 is not None else 0))
        proj = st["projector"]
        assert tuple(proj.shape) == ((rank, DIM) if p is model.attn.weight else (DIM, rank))
        assert set(st) == set(expected) | {"step", "side", "projector"}
    # plain 1-D parameter: a full second moment, 2-D: factored
    assert set(opt.state[model.norm.weight]) == {"step", "exp_avg_sq"} | ({"exp_avg"} if beta1 else set())
    assert tuple(opt.state[model.emb.weight]["exp_avg_sq_row"].shape) == (VOCAB,)
    assert tuple(opt.state[model.emb.weight]["exp_avg_sq_col"].shape) == (DIM,)


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_weights_only_checkpoint_resume_is_bit_identical(beta1):
    opts = dict(lr=1e-2, relative_step=False, scale_parameter=True, beta1=beta1, weight_decay=0.01)
    data = batches(10)
    full_model = make_model()
    full = GaLoreAdafactor(groups(full_model, 4, 3, "std"), **opts)
    train(full_model, full, data)

    model = make_model()
    opt = GaLoreAdafactor(groups(model, 4, 3, "std"), **opts)
    train(model, opt, data[:5])
    saved_model = copy.deepcopy(model.state_dict())
    saved = roundtrip(opt.state_dict())  # torch.load(weights_only=True)
    resumed_model = make_model(seed=123)
    resumed_model.load_state_dict(saved_model)
    resumed = GaLoreAdafactor(groups(resumed_model, 4, 3, "std"), **opts)
    resumed.load_state_dict(saved)
    train(resumed_model, resumed, data[5:])
    for a, b in zip(resumed_model.parameters(), full_model.parameters()):
        assert torch.equal(a, b)


def test_bf16_parameters_train_with_float32_state():
    model = make_model().to(torch.bfloat16)
    opt = GaLoreAdafactor(groups(model, 4, 3, "std"), lr=1e-2, relative_step=False, scale_parameter=False)
    w0 = model.attn.weight.detach().clone()
    for ids in batches(4):
        opt.zero_grad()
        model(ids).float().backward()
        opt.step()
    assert not torch.equal(model.attn.weight, w0) and torch.isfinite(model.attn.weight).all()
    st = opt.state[model.attn.weight]
    assert st["exp_avg_sq_row"].dtype == torch.float32 and st["projector"].dtype == torch.bfloat16


def test_plain_adafactor_when_no_group_is_lowrank():
    ours_model, ref_model = make_model(), make_model()
    data = batches(5)
    with pytest.warns(UserWarning, match="plain Adafactor"):
        ours = GaLoreAdafactor(ours_model.parameters(), lr=1e-2, relative_step=False, beta1=0.9)
    ref = galore_torch.GaLoreAdafactor(ref_model.parameters(), lr=1e-2, relative_step=False, beta1=0.9)
    train(ours_model, ours, data)
    train(ref_model, ref, data)
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(lr=1e-3), ValueError, "lr must be None with relative_step=True"),
    (dict(relative_step=False), ValueError, "lr must be a float >= 0 with relative_step=False"),
    (dict(lr=-1.0, relative_step=False), ValueError, "lr must be a float >= 0"),
    (dict(lr=1e-3, relative_step=False, warmup_init=True), ValueError, "warmup_init=True requires relative_step"),
    (dict(eps=1e-30), ValueError, "eps must be a pair"),
    (dict(eps=(1e-30, -1.0)), ValueError, "eps must be a pair"),
    (dict(clip_threshold=0.0), ValueError, "clip_threshold must be a float > 0"),
    (dict(decay_rate=0.5), ValueError, "decay_rate must be a float <= 0"),
    (dict(beta1=1.0), ValueError, r"beta1 must be None or a float in \[0, 1\)"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be a float >= 0"),
    (dict(scale_parameter="yes"), TypeError, "scale_parameter must be a bool"),
    (dict(rank=0), ValueError, "rank must be an int >= 1"),
    (dict(rank=25), ValueError, "rank 25 is out of range"),
    (dict(rank=4, proj_type="diagonal"), ValueError, "proj_type must be one of"),
    (dict(rank=4, svd="random"), ValueError, "svd must be 'exact' or 'lowrank'"),
    (dict(rank=4, update_proj_gap=0), ValueError, "update_proj_gap must be an int >= 1"),
])
def test_bad_arguments(kwargs, exc, match):
    model = make_model()
    with pytest.raises(exc, match=match):
        GaLoreAdafactor([model.attn.weight, model.mlp.weight], **kwargs)


def test_bad_group_leaves_optimizer_unchanged():
    model = make_model()
    opt = GaLoreAdafactor([{"params": [model.attn.weight], "rank": 4}])
    before = copy.deepcopy(opt.param_groups[0]["rank"]), len(opt.param_groups)
    with pytest.raises(ValueError, match="param group 1: rank 30 is out of range"):
        opt.add_param_group({"params": [model.mlp.weight], "rank": 30})
    assert (opt.param_groups[0]["rank"], len(opt.param_groups)) == before
    with pytest.raises(TypeError, match="must be floating point"):
        GaLoreAdafactor([torch.zeros(3, 3, dtype=torch.int64)])


def test_nonfinite_gradient_is_skipped():
    model = make_model()
    opt = GaLoreAdafactor(groups(model, 4, 3, "std"))
    train(model, opt, batches(2))
    w = model.attn.weight.detach().clone()
    state = {k: v.clone() for k, v in opt.state[model.attn.weight].items()}
    opt.zero_grad()
    model(batches(1, seed=5)[0]).backward()
    model.attn.weight.grad[0, 0] = math.nan
    opt.step()
    assert torch.equal(model.attn.weight, w)
    for k, v in opt.state[model.attn.weight].items():
        assert torch.equal(v, state[k]), k
    assert opt.nonfinite_skips == 1
