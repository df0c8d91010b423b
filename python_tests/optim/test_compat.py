"""compat="galore-torch" / "apollo-torch": the official packages' arithmetic in every group.

The main tests train a tiny LLaMA for 30 steps with real gradients (each implementation
runs its own forward/backward from its own weights on the same batches) and compare the
weights with the official package's, with weight decay on.
"""
import warnings

import pytest
import torch

from lowrank_kernels.optim import APOLLOAdamW, DCTAdamW, FrugalAdamW, GaLoreAdamW, QGaLoreAdamW

from ._helpers import galore_float64, grad_sequence, rel_change_err, roundtrip, run



def galore_torch():
    return pytest.importorskip("galore_torch")


def apollo_torch():
    return pytest.importorskip("apollo_torch")


PROJ_TYPES = ["std", "reverse_std", "left", "right", "full"]
STEPS = 30


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model is latency-bound: one thread is faster on a loaded machine, and the
    comparisons do not depend on it (both implementations run under the same setting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).float()


def batches(n=STEPS):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (4, 16), generator=gen) for _ in range(n)]


def split_groups(model, plain=None, **lowrank):
    """Attention and MLP weights projected (shapes 32x32, 16x32, 64x32, 32x64); the rest plain
    (no ``rank`` key, as galore-torch / apollo-torch require, unless ``plain`` adds keys)."""
    proj = [p for n, p in model.named_parameters() if p.dim() == 2 and ("self_attn" in n or "mlp" in n)]
    ids = {id(p) for p in proj}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": proj, **lowrank}, {"params": rest, **(plain or {})}]


def train(make_opt, lowrank, data, plain=None):
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_opt(split_groups(model, plain, **lowrank))
    for ids in data:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def assert_weights_match(ours, ref, tol=1e-5):
    """Per parameter: ||ours - ref|| <= tol * ||ref - w0|| (relative to how far the weights moved,
    stricter than relative to the weights) and <= tol * ||ref||."""
    w0 = tiny_llama()
    for (name, p), q, p0 in zip(ours.named_parameters(), ref.parameters(), w0.parameters()):
        assert not torch.equal(q, p0), name  # every parameter trained
        err = rel_change_err(p, q, p0)
        assert err < tol, (name, err)
        assert ((p - q).norm() / q.norm()).item() < tol, name


# --------------------------------------------------------------------------- tiny LLaMA, real gradients
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_galore_torch_tiny_llama(proj_type):
    """30 steps, one projector per weight (update_proj_gap=200, the packages' default): the only
    refresh is at step 1, from identical inputs. A later refresh takes the SVD of gradients that
    differ by rounding, and LAPACK may then return a singular vector with the opposite sign (seen
    here on a 16x32 k_proj at step 11 with proj_type="left"); galore-torch keeps the moments
    across a refresh, so one flipped sign changes the run in either implementation."""
    lowrank = dict(rank=8, update_proj_gap=200, scale=0.25, proj_type=proj_type)
    hp = dict(lr=1e-2, weight_decay=0.1, eps=1e-6)
    data = batches()
    ref = train(lambda g: galore_torch().GaLoreAdamW(g, **hp), lowrank, data)
    ours = train(lambda g: GaLoreAdamW(g, compat="galore-torch", **hp), lowrank, data)
    assert_weights_match(ours, ref)
    # Without compat the plain groups follow torch.optim.AdamW and the decay comes first: clearly different.
    default = train(lambda g: GaLoreAdamW(g, **hp), lowrank, data)
    emb = lambda m: m.model.embed_tokens.weight  # noqa: E731
    assert rel_change_err(emb(default), emb(ref), emb(tiny_llama())) > 1e-2


@pytest.mark.parametrize(
    "variant, lowrank, lr",
    [
        ("channel", dict(rank=8, scale=1.0, scale_type="channel"), 1e-2),
        # APOLLO-Mini (rank 1, tensor scaling, scale 128): at lr 1e-2 this tiny model's training is
        # chaotic (rounding differences grow 10x every few steps, for any two implementations).
        ("mini", dict(rank=1, scale=128.0, scale_type="tensor"), 1e-3),
    ],
)
def test_apollo_torch_tiny_llama(variant, lowrank, lr):
    """30 steps with new random projections at steps 11 and 21 (apollo-torch's seed sequence)."""
    lowrank = dict(lowrank, update_proj_gap=10, proj_type="std", proj="random")
    hp = dict(lr=lr, weight_decay=0.1, eps=1e-6)
    data = batches()
    ref = train(lambda g: apollo_torch().APOLLOAdamW(g, **hp), lowrank, data)
    ours = train(lambda g: APOLLOAdamW(g, compat="apollo-torch", **hp), lowrank, data)
    assert_weights_match(ours, ref)
    default = train(lambda g: APOLLOAdamW(g, **hp), lowrank, data)
    w = lambda m: m.model.layers[0].mlp.up_proj.weight  # noqa: E731
    assert rel_change_err(w(default), w(ref), w(tiny_llama())) > 1e-2


def test_apollo_mini_preset_with_compat():
    """APOLLOAdamW.mini(compat=...) is the apollo-torch Mini recipe."""
    data = batches(12)
    hp = dict(lr=1e-3, weight_decay=0.1)
    ref_keys = dict(rank=1, scale=128.0, scale_type="tensor", update_proj_gap=5, proj_type="std", proj="random")
    ref = train(lambda g: apollo_torch().APOLLOAdamW(g, **hp), ref_keys, data)
    ours = train(lambda g: APOLLOAdamW.mini(g, update_proj_gap=5, compat="apollo-torch", **hp), {}, data,
                 plain={"rank": None})
    assert_weights_match(ours, ref)


# --------------------------------------------------------------------------- plain groups, exactly
def plain_runs(shape, ours_cls, ref_cls, **kw):
    w0 = torch.randn(shape)
    grads = grad_sequence(shape, 7)
    hp = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    ours, _ = run(lambda p: ours_cls([{"params": [p], "rank": None}], **hp, **kw), w0, grads)
    ref, _ = run(lambda p: ref_cls([{"params": [p]}], **hp), w0, grads)
    torch_adamw, _ = run(lambda p: torch.optim.AdamW([p], **hp), w0, grads)
    return ours, ref, torch_adamw


@pytest.mark.parametrize("shape", [(37, 23), (29,)])
@pytest.mark.parametrize(
    "cls, ref_cls, mode",
    [(GaLoreAdamW, "galore_torch", "galore-torch"), (APOLLOAdamW, "apollo_torch", "apollo-torch")],
)
def test_plain_group_bit_identical(shape, cls, ref_cls, mode):
    mod = pytest.importorskip(ref_cls)
    ref_cls = mod.GaLoreAdamW if ref_cls == "galore_torch" else mod.APOLLOAdamW
    ours, ref, _ = plain_runs(shape, cls, ref_cls, compat=mode)
    assert torch.equal(ours, ref)
    # compat=None (default) is unchanged: bit-identical to torch.optim.AdamW, which differs from the packages.
    default, ref, torch_adamw = plain_runs(shape, cls, ref_cls)
    assert torch.equal(default, torch_adamw)
    assert not torch.allclose(default, ref, rtol=1e-4, atol=0)


def test_default_projected_step_unchanged():
    """compat=None keeps torch's decay order in the projected groups (independent float64 math)."""
    shape = (41, 29)
    w0 = torch.randn(shape, dtype=torch.float64)
    grads = [g.double() for g in grad_sequence(shape, 6)]
    kw = dict(rank=5, gap=3, scale=0.5, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, wd=0.1, side="right")
    ours, _ = run(
        lambda p: GaLoreAdamW([{"params": [p], "rank": 5, "update_proj_gap": 3, "scale": 0.5, "proj_type": "right"}],
                              lr=1e-2, weight_decay=0.1), w0, grads)
    torch.testing.assert_close(ours.detach(), galore_float64(w0, grads, **kw), rtol=1e-10, atol=1e-12)
    compat, _ = run(
        lambda p: GaLoreAdamW([{"params": [p], "rank": 5, "update_proj_gap": 3, "scale": 0.5, "proj_type": "right"}],
                              lr=1e-2, weight_decay=0.1, compat="galore-torch"), w0, grads)
    assert not torch.allclose(compat, ours, rtol=1e-8, atol=0)


def test_group_key_and_state_dict_roundtrip():
    """compat as a group key (one group compat, one not), and a checkpoint taken mid-run resumes exactly."""
    shape = (30, 20)
    w0 = torch.randn(shape)
    grads = grad_sequence(shape, 8)

    def make(p):
        return GaLoreAdamW([{"params": [p], "rank": 4, "update_proj_gap": 3, "compat": "galore-torch"}],
                           lr=1e-2, weight_decay=0.1)

    full, _ = run(make, w0, grads)
    half, opt = run(make, w0, grads[:4])
    assert opt.param_groups[0]["compat"] == "galore-torch"
    p = torch.nn.Parameter(half.detach().clone())
    opt2 = make(p)
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    for g in grads[4:]:
        p.grad = g.clone()
        opt2.step()
    assert torch.equal(p, full)
    ref_group = {"rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"}
    ref, _ = run(lambda q: galore_torch().GaLoreAdamW([{"params": [q], **ref_group}], lr=1e-2, weight_decay=0.1),
                 w0, grads)
    # Replayed random gradients move the weights little in 8 steps: a looser bound relative to the change.
    assert rel_change_err(full, ref, w0) < 1e-4


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "make",
    [
        lambda g: DCTAdamW(g, lr=1e-3),
        lambda g: FrugalAdamW(g, lr=1e-3),
        lambda g: QGaLoreAdamW(g, lr=1e-3),  # a GaLoreAdamW subclass: compat is not inherited
    ],
)
def test_refused_where_no_official_package_is_reproduced(make):
    p = torch.nn.Parameter(torch.randn(16, 12))
    with pytest.raises(ValueError, match="compat must be None"):
        make([{"params": [p], "rank": 4, "compat": "galore-torch"}])


def test_bad_values_raise_and_add_nothing():
    p = torch.nn.Parameter(torch.randn(16, 12))
    q = torch.nn.Parameter(torch.randn(16, 12))
    with pytest.raises(ValueError, match="compat must be one of 'galore-torch' or None, got 'apollo-torch'"):
        GaLoreAdamW([p], rank=4, compat="apollo-torch")
    with pytest.raises(ValueError, match="compat must be one of 'apollo-torch'"):
        APOLLOAdamW([p], rank=4, compat="galore_torch")
    opt = GaLoreAdamW([p], rank=4)
    with pytest.raises(ValueError, match="param group 1: compat"):
        opt.add_param_group({"params": [q], "compat": 1})
    assert len(opt.param_groups) == 1 and q not in opt._param_index


def test_plain_group_wide_moments():
    """Moments wider than a bfloat16 parameter: the step runs in the moments' dtype and the weight
    is rounded once per step (independent loop below)."""

    class Wide(GaLoreAdamW):
        compat_modes = ("galore-torch",)

        def _state_dtype(self, p, group):
            return torch.float32

    shape = (19, 13)
    w0 = torch.randn(shape).bfloat16()
    grads = grad_sequence(shape, 5, dtype=torch.bfloat16)
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.99, 1e-6, 0.1
    ours, opt = run(lambda p: Wide([{"params": [p], "rank": None}], lr=lr, betas=(b1, b2), eps=eps,
                                   weight_decay=wd, compat="galore-torch"), w0, grads)
    assert opt.state[ours]["exp_avg"].dtype == torch.float32
    w, m, v = w0.clone(), torch.zeros(shape), torch.zeros(shape)
    for t, g in enumerate(grads, start=1):
        g = g.float()
        m = m * b1 + (1 - b1) * g
        v = v * b2 + (1 - b2) * g * g
        w32 = w.float() - lr * (1 - b2**t) ** 0.5 / (1 - b1**t) * (m / (v.sqrt() + eps))
        w = (w32 - lr * wd * w32).bfloat16()
    assert (ours.detach().float() - w.float()).abs().max() <= 2 ** -7 * w.float().abs().max()
    torch.testing.assert_close(opt.state[ours]["exp_avg"], m, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("seed", [1, 2, 17, 123456789, 2**62 + 5])
def test_apollo_torch_seed_sequence(seed):
    next_seed = pytest.importorskip("apollo_torch.random_projector").next_seed

    from lowrank_kernels.optim.apollo import apollo_torch_next_seed

    assert apollo_torch_next_seed(seed) == next_seed(seed)
    assert apollo_torch_next_seed(seed) != APOLLOAdamW._next_seed(seed)  # the default sequence is our own
