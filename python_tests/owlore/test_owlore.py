"""lowrank_kernels.owlore: outlier ratios, sampling probabilities, the layer sampler.

Checks: the ratios equal a direct numpy implementation of OWL's formula (numpy forward
passes, no hooks) on a toy model and on a tiny LLaMA; the draws equal
``numpy.random.RandomState(seed).choice`` called in the same order; frozen layers'
weights stay bit-identical with every optimizer of the package (and ``layerwise``);
optimizer state is kept / on the CPU / absent per ``state``; state bytes stay bounded
under ``"drop"``; bad input raises; a resumed sampler continues the same sequence.
"""
import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

from lowrank_kernels.owlore import LayerSampler, layer_outlier_ratios, owlore_callback, sampling_probs
from lowrank_kernels.optim import (
    APOLLOAdamW, DCTAdamW, FrugalAdamW, GaLoreAdamW, QGaLoreAdamW, layerwise, lowrank_param_groups,
)


# ---------------------------------------------------------------------------- models

def tiny_llama(layers=4, dtype=torch.float32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype)


class ToyBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Toy(nn.Module):
    def __init__(self, d=7, h=11, n=3):
        super().__init__()
        self.blocks = nn.ModuleList(ToyBlock(d, h) for _ in range(n))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _np(t):
    return t.detach().to(torch.float64).numpy()


def ratio_np(weights_and_inputs, M):
    """OWL's D_l from (W, x) pairs: s = mean_tokens x^2, A = |W| sqrt(s), share above M * mean."""
    scores = []
    for w, x in weights_and_inputs:
        x = x.reshape(-1, x.shape[-1])
        s = (x ** 2).sum(0) / x.shape[0]
        scores.append((np.abs(w) * np.sqrt(s)[None, :]).ravel())
    a = np.concatenate(scores)
    return 100.0 * np.count_nonzero(a > M * a.mean()) / a.size


# ---------------------------------------------------------------------------- ratios

def test_ratios_toy_model_equal_numpy():
    torch.manual_seed(0)
    model = Toy().double()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 5, 7, generator=gen, dtype=torch.float64), torch.randn(3, 7, generator=gen,
                                                                                     dtype=torch.float64)]
    for b in batches:
        b[..., 2] *= 8.0  # an outlier feature
    for M in (2.0, 3.0):
        got = layer_outlier_ratios(model, model.blocks, batches, M=M)
        assert got.dtype == torch.float64 and got.shape == (3,)
        # numpy forward, per batch, collecting each Linear's input
        inputs = {(i, k): [] for i in range(3) for k in ("fc1", "fc2")}
        for b in batches:
            x = _np(b)
            for i, blk in enumerate(model.blocks):
                inputs[(i, "fc1")].append(x.reshape(-1, 7))
                hdn = np.maximum(x @ _np(blk.fc1.weight).T + _np(blk.fc1.bias), 0.0)
                inputs[(i, "fc2")].append(hdn.reshape(-1, 11))
                x = x + hdn @ _np(blk.fc2.weight).T
        want = [ratio_np([(_np(blk.fc1.weight), np.concatenate(inputs[(i, "fc1")])),
                          (_np(blk.fc2.weight), np.concatenate(inputs[(i, "fc2")]))], M)
                for i, blk in enumerate(model.blocks)]
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
        assert max(want) > 0


def _rms(x, w, eps):
    # transformers' LlamaRMSNorm normalizes in float32 whatever the model's dtype
    xf = x.astype(np.float32)
    y = xf / np.sqrt((xf ** 2).mean(-1, keepdims=True) + np.float32(eps))
    return y.astype(np.float64) * w


def _llama_numpy(model, ids):
    """A numpy float64 forward of transformers' LlamaForCausalLM (no cache, no padding),
    returning the logits and each decoder layer's Linear inputs (name -> [tokens, in])."""
    cfg = model.config
    H, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    eps = cfg.rms_norm_eps
    B, T = ids.shape
    # transformers computes the rotary angles in float32 whatever the model's dtype
    inv = (1.0 / theta ** (np.arange(0, d, 2).astype(np.float32) / d)).astype(np.float32)
    freqs = np.arange(T, dtype=np.float32)[:, None] * inv[None, :]
    emb = np.concatenate([freqs, freqs], -1)
    cos, sin = np.cos(emb).astype(np.float64), np.sin(emb).astype(np.float64)

    def rope(x):  # x: B, H, T, d
        rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
        return x * cos + rot * sin

    h = _np(model.model.embed_tokens.weight)[ids.numpy()]
    per_layer = []
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for layer in model.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        x1 = _rms(h, _np(layer.input_layernorm.weight), eps)

        def heads(w):
            return (x1 @ _np(w).T).reshape(B, T, H, d).transpose(0, 2, 1, 3)

        q, k, v = rope(heads(at.q_proj.weight)), rope(heads(at.k_proj.weight)), heads(at.v_proj.weight)
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, H * d)
        h = h + o @ _np(at.o_proj.weight).T
        x2 = _rms(h, _np(layer.post_attention_layernorm.weight), eps)
        g, u = x2 @ _np(mlp.gate_proj.weight).T, x2 @ _np(mlp.up_proj.weight).T
        a = g / (1.0 + np.exp(-g)) * u
        h = h + a @ _np(mlp.down_proj.weight).T
        flat = lambda z: z.reshape(B * T, -1)  # noqa: E731
        per_layer.append({"q_proj": flat(x1), "k_proj": flat(x1), "v_proj": flat(x1), "o_proj": flat(o),
                          "gate_proj": flat(x2), "up_proj": flat(x2), "down_proj": flat(a)})
    logits = _rms(h, _np(model.model.norm.weight), eps) @ _np(model.lm_head.weight).T
    return logits, per_layer


def test_ratios_tiny_llama_equal_numpy():
    model = tiny_llama(layers=3, dtype=torch.float64)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 12.0  # a massive-activation channel
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 64, (2, 9), generator=gen), torch.randint(0, 64, (1, 5), generator=gen)]
    inputs = [dict() for _ in range(3)]
    for ids in batches:
        logits, per_layer = _llama_numpy(model, ids)
        # the numpy forward is the model's forward (else the comparison below proves nothing)
        with torch.no_grad():
            # (float32 RMSNorm and rotary angles inside: agreement to float32 rounding)
            np.testing.assert_allclose(logits, model(input_ids=ids).logits.numpy(), rtol=1e-5, atol=1e-7)
        for l, d in enumerate(per_layer):
            for name, x in d.items():
                inputs[l].setdefault(name, []).append(x)
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for M in (3.0, 5.0):
        got = layer_outlier_ratios(model, batches=[{"input_ids": b} for b in batches], M=M)  # default layers
        want = []
        for l, layer in enumerate(model.model.layers):
            mods = dict(layer.named_modules())
            pairs = [(_np(mods[f"{'self_attn' if n.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{n}"]
                          .weight), np.concatenate(inputs[l][n])) for n in names]
            want.append(ratio_np(pairs, M))
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
        assert max(want) > 0
    assert model.training  # mode restored


def test_ratios_qlinear_uses_dequantized_weight():
    from lowrank_kernels.nn import quantize_linear_layers

    torch.manual_seed(0)
    model = Toy()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 7, generator=gen)]
    batches[0][:, 1] *= 6.0
    quantize_linear_layers(model, target_modules=("blocks",), group_size=7)
    dense = Toy()
    dense.load_state_dict({k: v for k, v in Toy().state_dict().items()})
    for (bq, bd) in zip(model.blocks, dense.blocks):
        with torch.no_grad():
            bd.fc1.weight.copy_(bq.fc1.dequantized_weight(torch.float32))
            bd.fc1.bias.copy_(bq.fc1.bias)
            bd.fc2.weight.copy_(bq.fc2.dequantized_weight(torch.float32))
    dense.head = model.head
    got = layer_outlier_ratios(model, model.blocks, batches, M=2.0)
    want = layer_outlier_ratios(dense, dense.blocks, batches, M=2.0)
    assert torch.equal(got, want) and want.max() > 0


def test_ratios_bad_input():
    model = Toy()
    x = [torch.randn(2, 7)]
    with pytest.raises(ValueError, match="model.model.layers"):
        layer_outlier_ratios(model, batches=x)
    with pytest.raises(ValueError, match="batches is required"):
        layer_outlier_ratios(model, model.blocks)
    with pytest.raises(ValueError, match="batches is empty"):
        layer_outlier_ratios(model, model.blocks, [])
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="M must be"):
            layer_outlier_ratios(model, model.blocks, x, M=bad)
    with pytest.raises(ValueError, match=r"layers\[0\].*no nn.Linear"):
        layer_outlier_ratios(model, [nn.ReLU()], x)
    with pytest.raises(ValueError, match="never called"):
        layer_outlier_ratios(model, [nn.Linear(3, 3)], x)
    with pytest.raises(TypeError, match="sequence of nn.Module"):
        layer_outlier_ratios(model, model.blocks[0], x)


# ---------------------------------------------------------------------------- probabilities

def test_sampling_probs_modes():
    d = np.array([0.5, 2.0, 1.0, 0.0, 3.5])
    L = d.size
    p = d / d.sum()
    q = p.max() - p
    want = {
        "owl": p,
        "owl_reverse": q / q.sum(),
        "uniform": np.full(L, 1.0 / L),
        "increase": np.arange(1, L + 1) / np.arange(1, L + 1).sum(),
        "decrease": np.arange(L, 0, -1) / np.arange(1, L + 1).sum(),
    }
    for mode, w in want.items():
        got = sampling_probs(torch.tensor(d), mode)
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), w, rtol=1e-15, atol=1e-15)
        assert abs(got.sum().item() - 1.0) < 1e-12
    np.testing.assert_array_equal(sampling_probs(list(d)).numpy(), sampling_probs(d).numpy())
    assert sampling_probs(d)[3] == 0 and sampling_probs(d, "owl_reverse")[4] == 0


def test_sampling_probs_bad_input():
    with pytest.raises(ValueError, match="mode must be one of"):
        sampling_probs([1.0, 2.0], "owl2")
    with pytest.raises(ValueError, match=">= 0"):
        sampling_probs([1.0, -2.0])
    with pytest.raises(ValueError, match="finite"):
        sampling_probs([1.0, float("inf")])
    with pytest.raises(ValueError, match="1-D"):
        sampling_probs([[1.0, 2.0]])
    with pytest.raises(ValueError, match="1-D"):
        sampling_probs([])
    with pytest.raises(ValueError, match="every ratio is 0"):
        sampling_probs([0.0, 0.0])
    with pytest.raises(ValueError, match="every ratio is equal"):
        sampling_probs([2.0, 2.0], "owl_reverse")
    with pytest.raises(TypeError, match="sequence of numbers"):
        sampling_probs(["a", object()])


# ---------------------------------------------------------------------------- the draw sequence

def _layers(n=6):
    return nn.ModuleList(nn.Linear(3, 3) for _ in range(n))


@pytest.mark.parametrize("mode", ["owl", "uniform", "increase", None])
def test_sequence_equals_randomstate_choice(mode):
    layers = _layers(7)
    probs = None if mode is None else sampling_probs([0.3, 1.2, 0.0, 2.2, 0.9, 0.1, 1.7], mode)
    s = LayerSampler(layers, probs, gamma=3, period=4, seed=111)
    rs = np.random.RandomState(111)
    p = None if probs is None else probs.numpy()
    assert s.active is None
    for step in range(30):
        for q in layers.parameters():  # a gradient left over from before the draw
            q.grad = torch.ones_like(q)
        drew = s.on_step(step)
        assert drew == (step % 4 == 0)
        if drew:
            idx = rs.choice(7, 3, replace=False) if p is None else rs.choice(7, 3, replace=False, p=p)
            assert s.active == sorted(idx.tolist())
        assert s.on_step(step) is False  # repeated call: no second draw
        for i, layer in enumerate(layers):
            assert all(q.requires_grad == (i in s.active) for q in layer.parameters())
            if drew:  # frozen at the draw: gradient dropped; drawn: left alone
                assert all((q.grad is not None) == (i in s.active) for q in layer.parameters())


def test_first_call_draws_at_any_step():
    s = LayerSampler(_layers(5), None, gamma=2, period=10, seed=3)
    assert s.on_step(7) is True
    first = s.active
    assert s.on_step(8) is False and s.active == first
    assert s.on_step(10) is True
    rs = np.random.RandomState(3)
    assert first == sorted(rs.choice(5, 2, replace=False).tolist())
    assert s.active == sorted(rs.choice(5, 2, replace=False).tolist())


def test_resume_continues_the_sequence():
    probs = sampling_probs([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    a = LayerSampler(_layers(), probs, gamma=2, period=3, seed=7)
    full = []
    for step in range(40):
        a.on_step(step)
        full.append(a.active)
    b = LayerSampler(_layers(), probs, gamma=2, period=3, seed=7)
    for step in range(17):
        b.on_step(step)
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    layers = _layers()
    c = LayerSampler(layers, probs, gamma=2, period=3, seed=7)
    c.load_state_dict(sd)
    assert c.active == full[16]
    for i, layer in enumerate(layers):  # the loaded active set is applied
        assert all(q.requires_grad == (i in c.active) for q in layer.parameters())
    resumed = full[:17]
    for step in range(17, 40):
        c.on_step(step)
        resumed.append(c.active)
    assert resumed == full
    # resuming exactly at a draw step draws once (the saved draw step was 15)
    d = LayerSampler(_layers(), probs, gamma=2, period=3, seed=7)
    d.load_state_dict(sd)
    assert d.on_step(18) is True and d.active == full[18]


def test_load_state_dict_mismatch_changes_nothing():
    s = LayerSampler(_layers(), None, gamma=2, period=3, seed=7)
    s.on_step(0)
    sd = s.state_dict()
    t = LayerSampler(_layers(), None, gamma=3, period=3, seed=7)
    with pytest.raises(ValueError, match="gamma"):
        t.load_state_dict(sd)
    assert t.active is None
    u = LayerSampler(_layers(), sampling_probs([1, 2, 3, 4, 5, 6.0]), gamma=2, period=3, seed=7)
    with pytest.raises(ValueError, match="probs"):
        u.load_state_dict(sd)
    v = LayerSampler(_layers(), None, gamma=2, period=3, seed=7)
    with pytest.raises(ValueError, match="active"):
        v.load_state_dict({**sd, "active": [0, 9]})
    assert v.active is None and all(q.requires_grad for q in v.layers[0].parameters())
    with pytest.raises(ValueError, match="'rng'"):
        v.load_state_dict({k: x for k, x in sd.items() if k != "rng"})
    with pytest.raises(ValueError, match="'rng'"):
        v.load_state_dict({**sd, "rng": {**sd["rng"], "keys": torch.zeros(3, dtype=torch.int64)}})
    assert v.active is None


def test_sampler_bad_input():
    layers = _layers(4)
    ok = [0.25] * 4
    cases = [
        (dict(probs=ok, gamma=5), ValueError, "larger than the number of layers"),
        (dict(probs=ok, gamma=0), ValueError, "gamma must be an int"),
        (dict(probs=ok, gamma=2.0), ValueError, "gamma must be an int"),
        (dict(probs=[0.5, 0.5, 0.5, 0.5]), ValueError, "sum to 1"),
        (dict(probs=[0.5, 0.6, -0.1, 0.0]), ValueError, ">= 0"),
        (dict(probs=[0.5, 0.5, 0.0]), ValueError, "length 3, but there are 4 layers"),
        (dict(probs=[1.0, 0.0, 0.0, 0.0], gamma=2), ValueError, "only 1 layers have a probability"),
        (dict(probs=[0.25, 0.25, float("nan"), 0.25]), ValueError, "finite"),
        (dict(probs=ok, period=0), ValueError, "period must be"),
        (dict(probs=ok, seed=-1), ValueError, "seed must be"),
        (dict(probs=ok, state="free"), ValueError, "state must be one of"),
        (dict(probs=ok, optimizer=object()), TypeError, "optimizer must be"),
    ]
    for kwargs, exc, msg in cases:
        kwargs = {"gamma": 2, **kwargs}
        with pytest.raises(exc, match=msg):
            LayerSampler(layers, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        LayerSampler([], None)
    with pytest.raises(TypeError, match=r"layers\[1\]"):
        LayerSampler([nn.Linear(2, 2), 3], None, gamma=1)
    s = LayerSampler(layers, ok, gamma=2, state="drop")
    with pytest.raises(ValueError, match="needs the optimizer"):
        s.on_step(0)
    assert s.active is None and all(q.requires_grad for q in layers.parameters())  # nothing changed
    with pytest.raises(ValueError, match="step must be"):
        s.on_step(-1)


def test_optimizer_missing_layer_params_is_refused():
    model = tiny_llama()
    LayerSampler(model.model.layers, None, gamma=2, period=2, seed=0).on_step(0)
    # layers frozen before the optimizer exists: lowrank_param_groups skips them
    opt = GaLoreAdamW(lowrank_param_groups(model, rank=4), lr=1e-2)
    for q in model.parameters():
        q.requires_grad_(True)
    with pytest.raises(ValueError, match="not in the optimizer"):
        LayerSampler(model.model.layers, None, gamma=2, state="drop", optimizer=opt)


def test_params_frozen_before_the_sampler_stay_frozen():
    layers = _layers(4)
    for layer in layers:
        layer.bias.requires_grad_(False)
    s = LayerSampler(layers, None, gamma=4, period=1)
    s.on_step(0)
    assert all(layer.weight.requires_grad and not layer.bias.requires_grad for layer in layers)


# ---------------------------------------------------------------------------- training

OPTIMIZERS = {
    "galore": lambda g: GaLoreAdamW(g, lr=1e-2, weight_decay=0.1),
    "dct": lambda g: DCTAdamW(g, lr=1e-2, weight_decay=0.1),
    "qgalore": lambda g: QGaLoreAdamW(g, lr=1e-2, weight_decay=0.1, quant_group_size=32),
    "apollo": lambda g: APOLLOAdamW(g, lr=1e-2, weight_decay=0.1),
    "frugal": lambda g: FrugalAdamW(g, lr=1e-2, weight_decay=0.1),
    "adamw": lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.1),
}


def _groups(model, name):
    if name == "adamw":
        return [{"params": list(model.parameters())}]
    if name == "frugal":
        return lowrank_param_groups(model, density=0.25, update_proj_gap=2)
    return lowrank_param_groups(model, rank=4, update_proj_gap=2)


def _batches(n, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 8), generator=gen) for _ in range(n)]


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _state_of(opt, q):
    from lowrank_kernels.optim import LayerwiseOptimizer

    if isinstance(opt, LayerwiseOptimizer):
        for p, o in zip(opt.params, opt.optimizers):
            if p is q:
                return o.state.get(q)
        raise KeyError("param not in the layerwise optimizer")
    return opt.state.get(q)


def _train(name, state, lw=False, steps=7, gamma=2, period=2, check=None, model=None):
    model = tiny_llama() if model is None else model
    groups = _groups(model, name)
    opt = layerwise(groups, OPTIMIZERS[name]) if lw else OPTIMIZERS[name](groups)
    s = LayerSampler(model.model.layers, sampling_probs([1.0, 2.0, 3.0, 4.0]), gamma=gamma, period=period,
                     seed=111, state=state, optimizer=opt)
    for step, ids in enumerate(_batches(steps)):
        s.on_step(step)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if check is not None:
            check(step, model, opt, s, before)
    return model, opt, s


def _layer_of(name):
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


@pytest.mark.parametrize("lw", [False, True], ids=["step", "layerwise"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_frozen_layers_bit_identical(name, lw):
    seen_active = set()

    def check(step, model, opt, s, before):
        for n, p in model.named_parameters():
            l = _layer_of(n)
            if l is None or l in s.active:
                continue
            assert torch.equal(p, before[n]), f"step {step}: frozen {n} changed"
            assert p.grad is None
        for l in s.active:  # every trained layer moved (weight decay alone moves it)
            for n, p in model.model.layers[l].named_parameters():
                assert not torch.equal(p, before[f"model.layers.{l}.{n}"]), f"step {step}: active layer {l} {n}"
        for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
            assert not torch.equal(dict(model.named_parameters())[n], before[n]), f"{n} did not train"
        seen_active.update(s.active)

    _train(name, "keep", lw=lw, check=check)
    assert len(seen_active) > 2  # layers were re-drawn


def _state_tensors(st):
    return [v for v in (st or {}).values() if isinstance(v, torch.Tensor)]


def _state_bytes(opt):
    from lowrank_kernels.optim import LayerwiseOptimizer

    opts = opt.optimizers if isinstance(opt, LayerwiseOptimizer) else [opt]
    return sum(t.numel() * t.element_size() for o in opts for st in o.state.values() for t in _state_tensors(st))


@pytest.mark.parametrize("lw", [False, True], ids=["step", "layerwise"])
@pytest.mark.parametrize("name", ["galore", "dct", "qgalore", "apollo", "frugal", "adamw"])
def test_drop_deletes_frozen_state_and_bounds_bytes(name, lw):
    one_layer_bytes = {}

    def check(step, model, opt, s, before):
        for l, layer in enumerate(model.model.layers):
            for q in layer.parameters():
                st = _state_of(opt, q)
                if l in s.active:
                    assert st, f"active layer {l} has no state"
                else:
                    assert not st, f"step {step}: frozen layer {l} kept its state"
        for q in (model.model.embed_tokens.weight, model.lm_head.weight):
            assert _state_of(opt, q)

    model, opt, s = _train(name, "drop", lw=lw, check=check)
    # the bound: gamma layers' state + the always-trained parameters', all layers being alike
    layer_bytes = [sum(t.numel() * t.element_size() for q in layer.parameters()
                       for t in _state_tensors(_state_of(opt, q))) for layer in model.model.layers]
    other = _state_bytes(opt) - sum(layer_bytes)
    per_layer = max(layer_bytes)
    assert per_layer > 0 and other > 0
    bound = s.gamma * per_layer + other
    assert _state_bytes(opt) <= bound
    _, kept_opt, _ = _train(name, "keep", lw=lw)
    assert _state_bytes(kept_opt) > bound  # keep grows past it (so the bound is not vacuous)


@pytest.mark.parametrize("name", ["galore", "apollo", "adamw"])
def test_keep_and_offload_keep_state_and_train_alike(name):
    def check(step, model, opt, s, before):
        for l, layer in enumerate(model.model.layers):
            for q in layer.parameters():
                st = _state_of(opt, q)
                if st:
                    assert all(t.device.type == "cpu" for t in _state_tensors(st))

    m_keep, o_keep, s_keep = _train(name, "keep")
    m_off, o_off, s_off = _train(name, "offload", check=check)
    for (n, a), (_, b) in zip(m_keep.named_parameters(), m_off.named_parameters()):
        assert torch.equal(a, b), n
    # every layer ever drawn still holds its state under keep and offload
    rs = np.random.RandomState(111)
    p = sampling_probs([1.0, 2.0, 3.0, 4.0]).numpy()
    trained = set()
    for step in range(0, 7, 2):
        trained.update(rs.choice(4, 2, replace=False, p=p).tolist())
    for opt, model in ((o_keep, m_keep), (o_off, m_off)):
        for l, layer in enumerate(model.model.layers):
            for q in layer.parameters():
                assert bool(_state_of(opt, q)) == (l in trained)


def test_reactivated_layer_step_counts():
    """keep: a re-activated layer continues its own step count; drop: it restarts."""
    active_steps = {l: [] for l in range(4)}
    rs = np.random.RandomState(111)
    p = sampling_probs([1.0, 2.0, 3.0, 4.0]).numpy()
    steps, period = 12, 2
    for step in range(steps):
        if step % period == 0:
            act = set(rs.choice(4, 2, replace=False, p=p).tolist())
        for l in act:
            active_steps[l].append(step)
    assert any(len(v) and v[-1] - v[0] + 1 > len(v) for v in active_steps.values())  # some layer came back
    for state in ("keep", "drop"):
        model, opt, s = _train("galore", state, steps=steps, period=period)
        last = active_steps
        for l, layer in enumerate(model.model.layers):
            st = opt.state.get(layer.self_attn.q_proj.weight)
            if state == "keep":
                want = len(last[l])
            else:  # consecutive steps of the last activation
                want = 0
                if l in s.active:
                    run = last[l]
                    want = 1
                    while want < len(run) and run[-want - 1] == run[-want] - 1:
                        want += 1
            assert (int(st["step"]) if st else 0) == want, (state, l)


def test_reactivated_layer_under_drop_starts_fresh():
    """Under drop, a re-activated layer's update equals a fresh optimizer's first step."""
    model = tiny_llama()
    opt = GaLoreAdamW(lowrank_param_groups(model, rank=4, update_proj_gap=50), lr=1e-2)
    s = LayerSampler(model.model.layers, None, gamma=1, period=1, seed=0, state="drop", optimizer=opt)
    history, compared = [], 0
    for step, ids in enumerate(_batches(8)):
        s.on_step(step)
        l = s.active[0]
        reactivated = l in history and history[-1] != l  # trained before, then frozen
        history.append(l)
        w = model.model.layers[l].mlp.up_proj.weight
        twin = copy.deepcopy(model)
        _lm_loss(model, ids).backward()
        tw = twin.model.layers[l].mlp.up_proj.weight
        for q in twin.parameters():
            q.requires_grad_(q is tw)
        _lm_loss(twin, ids).backward()
        fresh = GaLoreAdamW([{"params": [tw], "rank": 4, "update_proj_gap": 50}], lr=1e-2)
        fresh.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if history[-2:-1] != [l]:  # not a continuation of the previous step's layer
            torch.testing.assert_close(w, tw, rtol=0, atol=0)
            compared += reactivated
    assert compared >= 1, history


# ---------------------------------------------------------------------------- offload on an accelerator

@pytest.mark.gpu
def test_offload_moves_state_to_cpu_and_back_on_cuda():
    model = tiny_llama().cuda()
    ref = copy.deepcopy(model)
    opts = []
    for m, state in ((model, "offload"), (ref, "keep")):
        opt = GaLoreAdamW(lowrank_param_groups(m, rank=4, update_proj_gap=2), lr=1e-2)
        opts.append((m, opt, LayerSampler(m.model.layers, None, gamma=2, period=2, seed=1, state=state,
                                          optimizer=opt)))
    for step, ids in enumerate(_batches(8)):
        for m, opt, s in opts:
            s.on_step(step)
            _lm_loss(m, ids.cuda()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        m, opt, s = opts[0]
        for l, layer in enumerate(m.model.layers):
            for q in layer.parameters():
                st = opt.state.get(q)
                if not st:
                    continue
                devs = {t.device.type for k, t in st.items() if isinstance(t, torch.Tensor)
                        and k not in opt.host_state_keys}
                assert devs == ({"cuda"} if l in s.active else {"cpu"}), (step, l, devs)
    for a, b in zip(opts[0][0].parameters(), opts[1][0].parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- transformers Trainer

def test_trainer_callback(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r} for r in ids]
    opt = GaLoreAdamW(lowrank_param_groups(model, rank=4, update_proj_gap=2), lr=1e-2)
    sampler = LayerSampler(model.model.layers, sampling_probs([1.0, 1.0, 2.0, 2.0]), gamma=1, period=2,
                           seed=5, state="drop")
    seen = []
    cb = owlore_callback(sampler)
    orig = sampler.on_step

    def spy(step):
        drew = orig(step)
        seen.append((step, sampler.active))
        return drew

    sampler.on_step = spy
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4,
                             logging_steps=100, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None), callbacks=[cb]).train()
    assert [st for st, _ in seen] == [0, 1, 2, 3]
    rs = np.random.RandomState(5)
    p = sampling_probs([1.0, 1.0, 2.0, 2.0]).numpy()
    draws = [sorted(rs.choice(4, 1, replace=False, p=p).tolist()) for _ in range(2)]
    assert [a for _, a in seen] == [draws[0], draws[0], draws[1], draws[1]]
    assert sampler.optimizer is not None  # attached from the Trainer
    ever = set(draws[0]) | set(draws[1])
    for l, layer in enumerate(model.model.layers):
        changed = any(not torch.equal(q, start[f"model.layers.{l}.{n}"]) for n, q in layer.named_parameters())
        assert changed == (l in ever), l
        assert bool(opt.state.get(layer.mlp.up_proj.weight)) == (l in draws[1])


def test_callback_bad_input():
    with pytest.raises(TypeError, match="LayerSampler"):
        owlore_callback(object())


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("state", ["keep", "drop"])
def test_training_resume_is_exact(state):
    """model + optimizer + sampler checkpoint mid-period, then resume == one uninterrupted run."""
    batches = _batches(9)

    def build():
        model = tiny_llama()
        opt = GaLoreAdamW(lowrank_param_groups(model, rank=4, update_proj_gap=3), lr=1e-2, weight_decay=0.1)
        s = LayerSampler(model.model.layers, sampling_probs([1.0, 2.0, 3.0, 4.0]), gamma=2, period=2, seed=111,
                         state=state, optimizer=opt)
        return model, opt, s

    def train(model, opt, s, steps):
        for step in steps:
            s.on_step(step)
            _lm_loss(model, batches[step]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    ref = build()
    train(*ref, range(9))
    first = build()
    train(*first, range(5))
    ckpt = _roundtrip({"model": first[0].state_dict(), "opt": first[1].state_dict(), "sampler": first[2].state_dict()})
    second = build()
    second[0].load_state_dict(ckpt["model"])
    second[1].load_state_dict(ckpt["opt"])  # the optimizer first, then the sampler
    second[2].load_state_dict(ckpt["sampler"])
    assert second[2].active == first[2].active
    train(*second, range(5, 9))
    assert second[2].active == ref[2].active
    for (n, a), (_, b) in zip(ref[0].named_parameters(), second[0].named_parameters()):
        assert torch.equal(a, b), n


def test_owlore_callback_lives_in_integrations():
    """The Trainer callback is defined in lowrank_kernels.integrations.owlore;
    lowrank_kernels.owlore re-exports the same function."""
    import lowrank_kernels.integrations.owlore as integ_owlore
    import lowrank_kernels.owlore as owlore

    assert owlore.owlore_callback is integ_owlore.owlore_callback
    assert owlore_callback.__module__ == "lowrank_kernels.integrations.owlore"
