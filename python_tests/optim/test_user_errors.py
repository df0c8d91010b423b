"""What a new user meets first: no silent choice. Every refused call raises or warns, and
changes no weight and no optimizer state."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lowrank_kernels.optim import GaLoreAdamW, lowrank_param_groups


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class TinyLM(nn.Module):
    def __init__(self, vocab=50, d=16, tied=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([nn.ModuleDict({"attn": nn.Linear(d, d), "mlp": nn.Linear(d, 2 * d)})])
        self.proj = nn.Parameter(torch.randn(d, d))  # a raw 2-D parameter
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight


# ----------------------------------------------------------------------------- lowrank_param_groups
def test_groups_default_projects_every_matrix_of_a_transformer_encoder():
    layer = nn.TransformerEncoderLayer(32, 4, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's nested-tensor note
        model = nn.TransformerEncoder(layer, 2)
    low, plain = lowrank_param_groups(model, rank=4)
    names = {id(p): n for n, p in model.named_parameters()}
    got = sorted(names[id(p)] for p in low["params"])
    want = sorted(n for n, p in model.named_parameters() if p.dim() == 2)
    assert got == want and len(got) == 8
    assert any(n.endswith("in_proj_weight") for n in got)
    assert all(p.dim() == 1 for p in plain["params"])


@pytest.mark.parametrize("tied", [False, True])
def test_groups_leave_embeddings_and_head_plain(tied):
    model = TinyLM(tied=tied)
    low, plain = lowrank_param_groups(model, rank=4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in low["params"]) == ["blocks.0.attn.weight", "blocks.0.mlp.weight", "proj"]
    assert id(model.embed.weight) in {id(p) for p in plain["params"]}
    assert id(model.lm_head.weight) in {id(p) for p in plain["params"]}


def test_groups_head_by_shape_at_top_level():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(40, 8)
            self.body = nn.Linear(8, 8)
            self.unembed = nn.Parameter(torch.randn(8, 40))  # (d, vocab): the head

    model = M()
    low, _ = lowrank_param_groups(model, rank=2)
    assert [id(p) for p in low["params"]] == [id(model.body.weight)]


def test_groups_target_modules_narrows():
    model = TinyLM()
    low, _ = lowrank_param_groups(model, target_modules=("attn", "mlp"), rank=4)
    assert [id(p) for p in low["params"]] == [id(model.blocks[0].attn.weight), id(model.blocks[0].mlp.weight)]
    low, _ = lowrank_param_groups(model, target_modules="mlp", rank=4)
    assert [id(p) for p in low["params"]] == [id(model.blocks[0].mlp.weight)]


def test_groups_unknown_keyword_is_a_type_error():
    model = TinyLM()
    before = _weights(model)
    with pytest.raises(TypeError, match="'rnak'"):
        lowrank_param_groups(model, rnak=4)
    assert _same(before, _weights(model))
    # every optimizer's group keys are accepted
    lowrank_param_groups(model, rank=4, proj_type="reverse_std", scale_type="tensor", seed=3, moment_bits=8)
    lowrank_param_groups(model, density=0.25)


def test_flattened_parameters_are_refused_naming_the_fix():
    """A 1-D flat buffer holding flattened weights (DeepSpeed ZeRO marks its partitions with ``ds_*``
    attributes; FSDP1 with use_orig_params=False is covered by the 4-process tensor-parallel test)
    is refused by lowrank_param_groups and in a low-rank group, instead of being stepped as a plain
    parameter; an ordinary 1-D parameter in a low-rank group keeps its own message."""
    model = nn.Linear(4, 3)
    flat = nn.Parameter(torch.zeros(15))
    flat.ds_id, flat.ds_numel = 0, 15  # what deepspeed.runtime.zero sets on a partitioned parameter
    model.register_parameter("flat", flat)
    with pytest.raises(ValueError, match=r"lowrank_param_groups: parameter 'flat' is a DeepSpeed ZeRO partition.*"
                                         r"fully_shard.*use_orig_params=True.*DeepSpeed ZeRO is not supported"):
        lowrank_param_groups(model, rank=2)
    with pytest.raises(ValueError, match=r"param group 0: parameter 1 is a DeepSpeed ZeRO partition"):
        GaLoreAdamW([dict(params=[model.weight, flat], rank=2)])
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(3,\): a low-rank group takes 2-D weights only"):
        GaLoreAdamW([dict(params=[model.bias], rank=2)])


# ----------------------------------------------------------------------------- what is projected
def _record(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_warns_when_nothing_is_projected_with_a_fix():
    model = TinyLM()
    _, msgs = _record(lambda: GaLoreAdamW(model.parameters(), lr=1e-2))
    assert len(msgs) == 1 and "no parameter group is low-rank" in msgs[0] and "pass rank=" in msgs[0]
    # rank was passed, to the groups helper: the fix is not "pass rank="
    _, msgs = _record(lambda: GaLoreAdamW(lowrank_param_groups(model, rank=40), lr=1e-2))
    assert len(msgs) == 1 and "pass rank=" not in msgs[0] and "smaller rank" in msgs[0]
    _, msgs = _record(lambda: GaLoreAdamW(lowrank_param_groups(model, rank=40), rank=8, lr=1e-2))
    assert len(msgs) == 1 and "rank=8 is overridden" in msgs[0]


def test_warns_when_fewer_than_half_of_the_matrices_are_projected():
    model = TinyLM()
    _, msgs = _record(lambda: GaLoreAdamW(lowrank_param_groups(model, target_modules="mlp", rank=4), lr=1e-2))
    assert len(msgs) == 1 and "only 1 of the 5 2-D weights" in msgs[0] and "summary()" in msgs[0]
    _, msgs = _record(lambda: GaLoreAdamW(lowrank_param_groups(model, rank=4), lr=1e-2))
    assert msgs == []


def test_summary_lists_every_parameter():
    model = TinyLM()
    opt = GaLoreAdamW(lowrank_param_groups(model, rank=4), lr=1e-2)
    text = opt.summary(model.named_parameters())
    lines = {line.split()[0]: line.split() for line in text.splitlines()[2:]}
    assert len(lines) == len(list(model.parameters()))
    assert lines["blocks.0.mlp.weight"][1:5] == ["32x16", "projected", "4", "right"]
    assert lines["embed.weight"][2] == "plain" and lines["lm_head.weight"][2] == "plain"
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    text = opt.summary()
    assert "group0.0" in text and "state 0 bytes" not in text
    by = {line.split()[0]: int(line.split()[-1]) for line in text.splitlines()[2:]}
    assert by["group0.2"] > 0
    groups = lowrank_param_groups(model, rank=4)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        g["names"] = [names[id(p)] for p in g["params"]]
    assert "blocks.0.attn.weight" in GaLoreAdamW(groups, lr=1e-2).summary()


# ----------------------------------------------------------------------------- non-finite steps
def test_nonfinite_skip_warns_once_naming_the_parameter_and_is_counted():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(12, 10)), nn.Parameter(torch.randn(10))
    opt = GaLoreAdamW([{"params": [a], "rank": 4, "names": ["blk.w"]}, {"params": [b], "rank": None}], lr=1e-2)
    a.grad, b.grad = torch.randn(12, 10), torch.randn(10)
    opt.step()
    a0, st0 = a.detach().clone(), copy.deepcopy(opt.state[a])
    a.grad = torch.full((12, 10), float("nan"))
    b.grad = torch.randn(10)
    with pytest.warns(UserWarning, match=r"blk\.w .*not finite.*nonfinite_skip_count"):
        opt.step()
    assert torch.equal(a.detach(), a0)
    assert all(torch.equal(st0[k], opt.state[a][k]) for k in st0 if isinstance(st0[k], torch.Tensor))
    assert opt.nonfinite_skip_count() == 1
    a.grad, b.grad = None, torch.full((10,), float("inf"))
    _, msgs = _record(opt.step)
    assert msgs == [] and opt.nonfinite_skip_count() == 2


def test_nonfinite_skip_count_on_layerwise():
    from lowrank_kernels.optim import layerwise

    w = nn.Parameter(torch.randn(8, 6))
    lw = layerwise([{"params": [w], "rank": 2}], lambda g: GaLoreAdamW(g, lr=1e-2))
    w0 = w.detach().clone()
    with pytest.warns(UserWarning, match="parameter 0 .*not finite"):
        (w * float("nan")).sum().backward()
    assert lw.nonfinite_skip_count() == 1 and torch.equal(w.detach(), w0)


# ----------------------------------------------------------------------------- load_state_dict
def _trained(make, steps=2):
    torch.manual_seed(0)
    model = TinyLM()
    opt = make(lowrank_param_groups(model, rank=4, update_proj_gap=50))
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    return model, opt


def _snapshot(opt):
    return copy.deepcopy({"groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
                          "state": {i: dict(opt.state[p]) for i, p in enumerate(p for g in opt.param_groups
                                                                                for p in g["params"])}})


def _unchanged(before, opt):
    after = _snapshot(opt)
    if before["groups"] != after["groups"] or before["state"].keys() != after["state"].keys():
        return False
    return all(k in b2 and (torch.equal(v, b2[k]) if isinstance(v, torch.Tensor) else v == b2[k])
               for i, b in before["state"].items() for b2 in [after["state"][i]] for k, v in b.items())


def _refused(opt, model, sd, match):
    before, weights = _snapshot(opt), _weights(model)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert _unchanged(before, opt) and _same(weights, _weights(model))


def test_load_refuses_a_torch_adamw_state():
    model, opt = _trained(lambda g: GaLoreAdamW(g, lr=1e-2))
    ref = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    ref.step()
    sd = ref.state_dict()
    ids = iter(range(100))
    sd["param_groups"] = [dict(ref.state_dict()["param_groups"][0], params=[next(ids) for _ in g["params"]])
                          for g in opt.param_groups]
    order = [p for g in opt.param_groups for p in g["params"]]
    sd["state"] = {i: ref.state[p] for i, p in enumerate(order)}
    _refused(opt, model, sd,
             r"GaLoreAdamW.load_state_dict: param group 0.*another optimizer.*lacks .*'rank'.*has 'amsgrad'")


def test_load_refuses_another_methods_state():
    from lowrank_kernels.optim import DCTAdamW

    model, galore = _trained(lambda g: GaLoreAdamW(g, lr=1e-2))
    _, dct = _trained(lambda g: DCTAdamW(g, lr=1e-2))
    _refused(dct, model, galore.state_dict(), r"DCTAdamW.load_state_dict.*another optimizer.*lacks .*'norm'")
    _refused(galore, model, dct.state_dict(), r"GaLoreAdamW.load_state_dict.*another optimizer.*'norm'")


def test_load_refuses_a_plain_state_for_a_projected_parameter_and_a_changed_rank():
    model, opt = _trained(lambda g: GaLoreAdamW(g, lr=1e-2))
    sd = opt.state_dict()
    plain = copy.deepcopy(sd)
    first = plain["param_groups"][0]["params"][0]
    w = opt.param_groups[0]["params"][0]
    plain["state"][first] = {"step": torch.tensor(2.0), "exp_avg": torch.zeros_like(w),
                             "exp_avg_sq": torch.zeros_like(w)}
    _refused(opt, model, plain, r"param group 0, parameter 0: the saved state is plain AdamW.*rank 4")
    other = copy.deepcopy(sd)
    other["param_groups"][0]["rank"] = 2
    _refused(opt, model, other, r"param group 0, parameter 0: rank changed: saved 2, this optimizer 4")
    opt.load_state_dict(sd)  # its own state loads


# ----------------------------------------------------------------------------- fallbacks and presets
@pytest.mark.parametrize("bad", [{"scale": 0.0}, {"scale": -1.0}, {"rank": 0}, {"rank": -2}])
@pytest.mark.parametrize("name", ["GaLoreAdamW", "DCTAdamW", "APOLLOAdamW", "QGaLoreAdamW", "GradNormLoRPAdamW"])
def test_nonpositive_scale_and_rank_refused(name, bad):
    import lowrank_kernels.optim as O

    w = nn.Parameter(torch.randn(8, 6))
    w0 = w.detach().clone()
    key = next(iter(bad))
    with pytest.raises(ValueError, match=f"param group 0: {key} must be"):
        getattr(O, name)([{"params": [w], "rank": 2, **bad}], lr=1e-2)
    assert torch.equal(w.detach(), w0)


def test_apollo_mini_warns_when_groups_override_its_preset():
    from lowrank_kernels.optim import APOLLOAdamW

    model = TinyLM()
    with pytest.warns(UserWarning, match=r"APOLLOAdamW.mini: param group 0 sets rank=4.*overrides the Mini preset"):
        opt = APOLLOAdamW.mini(lowrank_param_groups(model, rank=4), lr=1e-2)
    assert opt.param_groups[0]["rank"] == 4
    _, msgs = _record(lambda: APOLLOAdamW.mini(lowrank_param_groups(model), lr=1e-2))
    assert msgs == []


def _lw(accumulation_steps=2):
    from lowrank_kernels.optim import layerwise

    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 6))
    lw = layerwise([{"params": [w], "rank": 2}], lambda g: GaLoreAdamW(g, lr=1e-2),
                   accumulation_steps=accumulation_steps)
    return w, lw


@pytest.mark.parametrize("reset", ["none", "zero", "lw"])
def test_layerwise_warns_when_a_window_saw_a_zero_grad(reset):
    w, lw = _lw()
    w0 = w.detach().clone()
    (w * 2).sum().backward()
    if reset == "none":
        w.grad = None
    elif reset == "zero":
        w.grad.zero_()
    if reset == "lw":
        with pytest.warns(UserWarning, match="zero_grad.*after micro-batch 1.*accumulation_steps=2"):
            lw.zero_grad()
        assert torch.equal(w.detach(), w0)
        return
    with pytest.warns(UserWarning, match="gradient of parameter 0 .* was reset .*after micro-batch 1"):
        (w * 2).sum().backward()


def test_layerwise_full_windows_do_not_warn():
    w, lw = _lw()

    def run():
        for _ in range(3):
            for _ in range(2):
                (w * 2).sum().backward()
            lw.zero_grad()

    _, msgs = _record(run)
    assert msgs == []


def test_sharded_plain_parameter_keeping_32bit_moments_warns(monkeypatch):
    """A plain parameter whose 8-bit blocks would straddle its shards (FSDP2 1-D, TP dim 1)
    keeps 32-bit moments, and says so instead of silently."""
    from lowrank_kernels.optim import GaLoreAdamW, distributed as dist_mod, plain

    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = GaLoreAdamW([p], moment_bits=8, min_8bit_size=16)
    group = opt.param_groups[0]
    state = {}
    plain.init_state(p, state, group)
    assert state["exp_avg"].dtype == torch.uint8  # not sharded: 8-bit
    monkeypatch.setattr(dist_mod, "is_dtensor", lambda t: True)
    monkeypatch.setattr(dist_mod, "has_col_shard", lambda t: True)
    state = {}
    with pytest.warns(UserWarning, match="keep 32-bit moments"):
        plain.init_state(p, state, group)
    assert state["exp_avg"].dtype == torch.float32
