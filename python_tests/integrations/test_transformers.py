"""lowrank_kernels.integrations.transformers: the HF Trainer drop-in on a tiny LLaMA (CPU)."""
import warnings

import pytest
import torch

from lowrank_kernels.integrations import transformers as integ
from lowrank_kernels.optim import APOLLOAdamW, GaLoreAdamW

STEPS = 20


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model is latency-bound: one thread is faster on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(tie=False):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tie,
    )
    return tf.LlamaForCausalLM(cfg).float()


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n=80, length=16):
        gen = torch.Generator().manual_seed(3)
        self.data = torch.randint(0, 64, (n, length), generator=gen)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def make_trainer(model, out_dir, pair, **args):
    tf = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    kw = dict(
        output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=4, save_strategy="steps",
        save_steps=10, use_cpu=True, report_to=[], logging_steps=1000, lr_scheduler_type="linear",
        warmup_steps=3, seed=7, disable_tqdm=True, dataloader_num_workers=0,
    )
    kw.update(args)
    return tf.Trainer(model=model, args=tf.TrainingArguments(**kw), train_dataset=RandomTokens(),
                      optimizer_cls_and_kwargs=pair)


def train(out_dir, pair, resume=None, **args):
    model = tiny_llama()
    trainer = make_trainer(model, out_dir, pair, **args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def hf_groups(model, target_modules):
    """transformers' own GaLore selection (optim="galore_adamw"): its projected params."""
    tf = pytest.importorskip("transformers")
    pytest.importorskip("galore_torch")
    pytest.importorskip("accelerate")
    args = tf.TrainingArguments(output_dir="unused", optim="galore_adamw", optim_target_modules=target_modules,
                                use_cpu=True, report_to=[])
    _, kwargs = tf.Trainer.get_optimizer_cls_and_kwargs(args, model)
    (proj,) = [g for g in kwargs["params"] if "rank" in g]
    return {id(p) for p in proj["params"]}


def names_of(model, ids):
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def projected(groups):
    return {id(p) for g in groups if g.get("rank") is not None for p in g["params"]}


# --------------------------------------------------------------------------- selection
@pytest.mark.parametrize(
    "target_modules",
    [["attn", "mlp"], ["q_proj", "model.layers.1.mlp.down_proj"], r".*\.(k|v)_proj", [r"model\.layers\.0\..*"],
     "all-linear", "all_linear"],
)
def test_groups_equal_hf_selection(target_modules):
    """Projected params equal transformers' selection (list: exact / substring / regex; regex string;
    all-linear), the output embedding aside: HF projects lm_head under all-linear, ours only when asked."""
    model = tiny_llama()
    hf = hf_groups(model, target_modules)
    lm_head = {id(model.lm_head.weight)}
    ours = projected(integ.trainer_param_groups(model, target_modules, lr=1e-3, rank=8))
    assert names_of(model, ours) == names_of(model, hf - lm_head)
    asked = projected(integ.trainer_param_groups(model, target_modules, lr=1e-3, rank=8, project_lm_head=True))
    assert names_of(model, asked) == names_of(model, hf)
    if integ._is_all_linear(target_modules):
        assert lm_head <= hf and not lm_head & ours


def test_frozen_small_and_no_decay_rules():
    model = tiny_llama()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    model.model.norm.weight.requires_grad_(False)
    groups = integ.trainer_param_groups(model, ["attn", "mlp"], lr=1e-3, weight_decay=0.1, rank=16)
    names = {n: g for g in groups for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    # frozen parameters are in no group
    assert "model.layers.0.mlp.up_proj.weight" not in names and "model.norm.weight" not in names
    # min(m, n) <= rank (k_proj/v_proj are 16 x 32, rank 16) stays plain; decayed as a weight
    for n in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        assert names[n]["rank"] is None and names[n]["weight_decay"] == 0.1
    assert names["model.layers.0.self_attn.q_proj.weight"]["rank"] == 16
    # norms are not decayed (the Trainer's rule); embeddings and lm_head are, and stay plain
    assert names["model.layers.1.input_layernorm.weight"]["weight_decay"] == 0.0
    emb = names["model.embed_tokens.weight"]
    assert emb["rank"] is None and emb["weight_decay"] == 0.1
    assert names["lm_head.weight"]["rank"] is None
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    # project_small: the 16 x 32 weights are projected at rank 16 = min(m, n)
    small = integ.trainer_param_groups(model, ["attn", "mlp"], lr=1e-3, rank=32, project_small=True)
    ranks = {n: g["rank"] for g in small for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    assert ranks["model.layers.0.self_attn.k_proj.weight"] == 16
    assert ranks["model.layers.0.self_attn.q_proj.weight"] == 32
    with pytest.raises(ValueError, match="no nn.Linear module matches"):
        integ.trainer_param_groups(model, ["nothing_here"], lr=1e-3)


def test_tied_embeddings_appear_once():
    model = tiny_llama(tie=True)
    groups = integ.trainer_param_groups(model, "all-linear", lr=1e-3, rank=8)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and id(model.lm_head.weight) not in projected(groups)


# --------------------------------------------------------------------------- hyper-parameters
def test_hyperparameters_reach_every_group():
    model = tiny_llama()
    factory, kwargs = integ.lowrank_optimizer(
        "galore_adamw", target_modules=["attn", "mlp"],
        optim_args="rank=8, update_proj_gap=50,scale=0.5,proj_type=left",
        lr=3e-3, weight_decay=0.05, betas=(0.8, 0.95), eps=1e-7, svd="lowrank",
    )
    opt = factory()(model, **kwargs)
    assert isinstance(opt, GaLoreAdamW)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    for g in opt.param_groups:
        assert g["lr"] == 3e-3 and g["betas"] == (0.8, 0.95) and g["eps"] == 1e-7
        assert g["weight_decay"] in (0.05, 0.0)
    proj = [g for g in opt.param_groups if g["rank"] is not None]
    assert len(proj) == 1
    g = proj[0]
    assert (g["rank"], g["update_proj_gap"], g["scale"], g["proj_type"], g["svd"]) == (8, 50, 0.5, "left", "lowrank")
    assert type(g["rank"]) is int and type(g["scale"]) is float
    assert any(x["weight_decay"] == 0.0 for x in opt.param_groups)  # the norms' group


def test_names_defaults_and_presets():
    model = tiny_llama()
    f, kw = integ.lowrank_optimizer("apollo_mini", target_modules=["mlp"], lr=1e-2)
    opt = f()(model, **kw)
    (g,) = [g for g in opt.param_groups if g["rank"] is not None]
    assert isinstance(opt, APOLLOAdamW) and (g["rank"], g["scale_type"], g["scale"]) == (1, "tensor", 128.0)
    f, kw = integ.lowrank_optimizer("apollo_adamw", target_modules=["mlp"], optim_args="rank=4", lr=1e-2,
                                    compat="apollo-torch")
    opt = f()(model, **kw)
    (g,) = [g for g in opt.param_groups if g["rank"] is not None]
    got = (g["rank"], g["scale_type"], g["scale"], g["update_proj_gap"], g["compat"])
    assert got == (4, "channel", 1.0, 200, "apollo-torch")
    assert all(x["compat"] == "apollo-torch" for x in opt.param_groups)
    # transformers' GaLore defaults: rank 128 (so every weight of this tiny model stays plain, min(m, n) <= 128)
    f, kw = integ.lowrank_optimizer("galore_adamw", target_modules="all-linear", lr=1e-2)
    with pytest.warns(UserWarning, match="no parameter group is low-rank"):
        opt = f()(model, **kw)
    assert all(g["rank"] is None for g in opt.param_groups) and opt.defaults["rank"] == 128
    for name, args in (("dct_adamw", "rank=8,"), ("qgalore_adamw", "rank=8,"), ("frugal_adamw", "")):
        f, kw = integ.lowrank_optimizer(name, target_modules=["mlp"], optim_args=args + "update_proj_gap=7", lr=1e-3)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*no parameter group is low-rank")  # a low-rank group exists
            opt = f()(model, **kw)
        assert type(opt).__name__.lower().startswith(name.split("_")[0])
        proj = [g for g in opt.param_groups if opt._is_lowrank(g)]
        assert len(proj) == 1 and proj[0]["update_proj_gap"] == 7 and len(proj[0]["params"]) == 6


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown optimizer name 'galore'"):
        integ.lowrank_optimizer("galore", target_modules=["attn"], lr=1e-3)
    with pytest.raises(ValueError, match="has no argument 'rnk'"):
        integ.lowrank_optimizer("galore_adamw", target_modules=["attn"], optim_args="rnk=4", lr=1e-3)
    with pytest.raises(ValueError, match="rank='four' is not a valid int"):
        integ.lowrank_optimizer("galore_adamw", target_modules=["attn"], optim_args="rank=four", lr=1e-3)
    with pytest.raises(ValueError, match="is not key=value"):
        integ.lowrank_optimizer("galore_adamw", target_modules=["attn"], optim_args="rank", lr=1e-3)
    with pytest.raises(ValueError, match="set lr with lowrank_optimizer"):
        integ.lowrank_optimizer("galore_adamw", target_modules=["attn"], optim_args="lr=0.1", lr=1e-3)
    with pytest.raises(ValueError, match="both in optim_args and as a keyword"):
        integ.lowrank_optimizer("galore_adamw", target_modules=["attn"], optim_args="rank=4", lr=1e-3, rank=8)
    with pytest.raises(TypeError, match="target_modules must be"):
        integ.lowrank_optimizer("galore_adamw", target_modules=None, lr=1e-3)
    with pytest.raises(TypeError, match="no keyword argument 'bogus'"):
        integ.lowrank_optimizer("galore_adamw", target_modules=["attn"], lr=1e-3, bogus=1)
    with pytest.raises(ValueError, match="lr must be a float >= 0"):
        integ.lowrank_optimizer("galore_adamw", target_modules=["attn"], lr=-1.0)
    with pytest.raises(ValueError, match="compat must be one of 'apollo-torch'"):
        integ.lowrank_optimizer("apollo_adamw", target_modules=["attn"], lr=1e-3, compat="galore-torch")
    with pytest.raises(TypeError, match="DCTAdamW has no keyword argument 'compat'"):
        integ.lowrank_optimizer("dct_adamw", target_modules=["attn"], lr=1e-3, compat="galore-torch")
    # a name listed before its optimizer exists: a clear error naming what is missing
    integ.OPTIMIZERS["future_adamw"] = integ._Entry("FutureAdamW")
    try:
        with pytest.raises(ValueError, match="needs lowrank_kernels.optim.FutureAdamW"):
            integ.lowrank_optimizer("future_adamw", target_modules=["attn"], lr=1e-3)
    finally:
        del integ.OPTIMIZERS["future_adamw"]
    integ.OPTIMIZERS["future_8bit"] = integ._Entry("GaLoreAdamW", fixed={"no_such_arg": 8})
    try:
        with pytest.raises(ValueError, match=r"needs GaLoreAdamW\(no_such_arg=...\)"):
            integ.lowrank_optimizer("future_8bit", target_modules=["attn"], lr=1e-3)
    finally:
        del integ.OPTIMIZERS["future_8bit"]


def test_optim_args_typed_conversion():
    out = integ.parse_optim_args("rank=4,scale=2,proj_type=right,skip_nonfinite=false,foreach=none", GaLoreAdamW)
    assert out == {"rank": 4, "scale": 2.0, "proj_type": "right", "skip_nonfinite": False, "foreach": None}
    assert type(out["scale"]) is float


# --------------------------------------------------------------------------- Trainer: save / resume
def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("layerwise", [False, True], ids=["standard", "layerwise"])
def test_trainer_resume_bit_identical(tmp_path, layerwise):
    """20 steps uninterrupted == 10 steps, save, a fresh Trainer resumes from the step-10 checkpoint
    (optimizer state, LR schedule with warm-up and decay, RNG): weights bit-identical. GaLore refreshes
    its projector at steps 1, 6, 11, 16, so the resumed part refreshes from restored state."""
    pair = integ.lowrank_optimizer(
        "galore_adamw", target_modules=["attn", "mlp"], optim_args="rank=8,update_proj_gap=5", lr=1e-2,
        weight_decay=0.01, layerwise=layerwise,
    )
    extra = dict(max_grad_norm=0.0) if layerwise else {}
    full, trainer = train(tmp_path / "full", pair, **extra)
    opt = trainer.optimizer.optimizer  # accelerate's wrapper holds ours
    if layerwise:
        assert isinstance(opt, integ.TrainerLayerwiseOptimizer)
        state = opt.state_dict()["layerwise"]
        assert len(state["optimizers"]) == len(list(full.parameters()))
        # the linear schedule reached every per-parameter group: lr after 20 of 20 steps is 0
        assert all(g["lr"] == 0.0 for g in opt.param_groups)
    else:
        assert isinstance(opt, GaLoreAdamW)
    # the step-10 checkpoint holds the optimizer state, loadable with weights_only=True (as the Trainer does)
    saved = torch.load(tmp_path / "full" / "checkpoint-10" / "optimizer.pt", weights_only=True)
    assert saved
    resumed, _ = train(tmp_path / "full", pair, resume=str(tmp_path / "full" / "checkpoint-10"), **extra)
    _assert_same(_weights(resumed), _weights(full))
    # and the run did train (weights moved from the initial ones)
    init = _weights(tiny_llama())
    assert all(not torch.equal(init[n], w) for n, w in _weights(full).items())


@pytest.mark.parametrize("name", ["galore_adamw", "apollo_adamw"])
def test_layerwise_matches_standard_run(tmp_path, name):
    """Layer-wise updates with the Trainer's scheduler give the standard run's weights (same LR per
    update: parameter p's t-th update uses the rate after t-1 scheduler steps; APOLLO: the same seeds)."""
    kw = dict(target_modules=["attn", "mlp"], optim_args="rank=8,update_proj_gap=5", lr=1e-2, weight_decay=0.01)
    std, _ = train(tmp_path / "std", integ.lowrank_optimizer(name, **kw), max_steps=8, save_strategy="no",
                   max_grad_norm=0.0)
    lw, _ = train(tmp_path / "lw", integ.lowrank_optimizer(name, layerwise=True, **kw), max_steps=8,
                  save_strategy="no", max_grad_norm=0.0)
    a, b = _weights(std), _weights(lw)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-6, atol=1e-7, msg=n)


def test_layerwise_refuses_gradient_accumulation(tmp_path):
    model = tiny_llama()
    before = _weights(model)
    pair = integ.lowrank_optimizer("galore_adamw", target_modules=["attn", "mlp"], optim_args="rank=8", lr=1e-2,
                                   layerwise=True)
    trainer = make_trainer(model, tmp_path, pair, gradient_accumulation_steps=2, max_grad_norm=0.0, max_steps=2)
    with pytest.raises(ValueError, match="does not support gradient accumulation"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
    _assert_same(_weights(model), before)  # refused before any update


def test_layerwise_state_dict_refuses_standard_checkpoint():
    model = tiny_llama()
    f, kw = integ.lowrank_optimizer("galore_adamw", target_modules=["mlp"], optim_args="rank=8", lr=1e-2,
                                    layerwise=True)
    opt = f()(model, **kw)
    with pytest.raises(ValueError, match="not a layer-wise state dict"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    # building again for the same model replaces the hooks (one update per backward, not two)
    opt2 = f()(model, **kw)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    steps = [int(o.state[p]["step"]) for o, p in zip(opt2.layerwise.optimizers, opt2.layerwise.params)]
    assert steps == [1] * len(steps)
    assert all(len(o.state) == 0 for o in opt.layerwise.optimizers)


def test_layerwise_refuses_distributed(monkeypatch):
    model = tiny_llama()
    f, kw = integ.lowrank_optimizer("galore_adamw", target_modules=["mlp"], optim_args="rank=8", lr=1e-2,
                                    layerwise=True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    with pytest.raises(ValueError, match="does not support distributed training"):
        f()(model, **kw)
    assert all(p._post_accumulate_grad_hooks is None or not p._post_accumulate_grad_hooks for p in model.parameters())
    f, kw = integ.lowrank_optimizer("galore_adamw", target_modules=["mlp"], optim_args="rank=8", lr=1e-2)
    assert isinstance(f()(model, **kw), GaLoreAdamW)  # the standard mode is fine under DDP


def test_quick_path_params_in_kwargs(tmp_path):
    """The path that needs no integration: our optimizer class with ready param groups (one device /
    DDP; not FSDP, which wraps the parameters after these groups were taken)."""
    from lowrank_kernels.optim import lowrank_param_groups

    model = tiny_llama()
    groups = lowrank_param_groups(model, target_modules=["attn", "mlp"], rank=8, update_proj_gap=5)
    trainer = make_trainer(model, tmp_path, (GaLoreAdamW, {"params": groups, "lr": 1e-2}), max_steps=4,
                           save_strategy="no")
    before = _weights(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, GaLoreAdamW) and opt.param_groups[0]["rank"] == 8
    assert all(int(opt.state[p]["step"]) == 4 for p in opt.param_groups[0]["params"])
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_compat_reproduces_transformers_galore_path(tmp_path):
    """Trainer(optim="galore_adamw") (transformers' own path: galore-torch, only lr passed, so
    weight_decay 0 and eps 1e-6) == our factory with compat="galore-torch" and the same settings."""
    pytest.importorskip("galore_torch")
    common = dict(max_steps=12, save_strategy="no", learning_rate=1e-2)
    hf, _ = train(tmp_path / "hf", None, optim="galore_adamw", optim_target_modules=["attn", "mlp"],
                  optim_args="rank=8", **common)
    pair = integ.lowrank_optimizer("galore_adamw", target_modules=["attn", "mlp"], optim_args="rank=8", lr=1e-2,
                                   compat="galore-torch")
    ours, _ = train(tmp_path / "ours", pair, **common)
    init = _weights(tiny_llama())
    a, b = _weights(ours), _weights(hf)
    for n in a:
        err = ((a[n] - b[n]).norm() / (b[n] - init[n]).norm()).item()
        assert err < 1e-5, (n, err)


# --------------------------------------------------------------------------- the other names in a Trainer run
@pytest.mark.parametrize("name,extra,expect", [
    # transformers' galore_adafactor settings (lr given, relative_step=False, scale_parameter=False);
    # Adafactor's eps is its pair, its first moment beta1
    ("galore_adafactor", dict(eps=(1e-29, 2e-3), beta1=0.5),
     dict(eps=(1e-29, 2e-3), beta1=0.5, relative_step=False, scale_parameter=False)),
    ("gradnormlorp_adamw", dict(betas=(0.8, 0.95), eps=1e-7), dict(betas=(0.8, 0.95), eps=1e-7)),
])
def test_trainer_runs_adafactor_and_gradnormlorp(tmp_path, name, extra, expect):
    """A short Trainer run for each name: the right class, every hyper-parameter in every group
    (the Trainer's linear schedule reached them all: lr 0 after the last step), every parameter
    stepped, projected and plain weights moved."""
    pair = integ.lowrank_optimizer(name, target_modules=["attn", "mlp"], optim_args="rank=8,update_proj_gap=3",
                                   lr=1e-2, weight_decay=0.05, **extra)
    init = _weights(tiny_llama())
    model, trainer = train(tmp_path, pair, max_steps=5, save_strategy="no", warmup_steps=1)
    opt = trainer.optimizer.optimizer
    assert type(opt).__name__ == integ.OPTIMIZERS[name].cls_name
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    for g in opt.param_groups:
        assert g["lr"] == 0.0 and g["initial_lr"] == 1e-2
        assert g["weight_decay"] in (0.05, 0.0)
        assert all(g[k] == v for k, v in expect.items()), g
    assert {g["weight_decay"] for g in opt.param_groups} == {0.05, 0.0}  # norms are not decayed
    (proj,) = [g for g in opt.param_groups if g["rank"] is not None]
    assert (proj["rank"], proj["update_proj_gap"], len(proj["params"])) == (8, 3, 14)
    for g in opt.param_groups:
        for p in g["params"]:
            assert int(opt.state[p]["step"]) == 5
    w = _weights(model)
    assert all(torch.isfinite(w[n]).all() and not torch.equal(init[n], w[n]) for n in w)


def test_adafactor_name_errors():
    with pytest.raises(ValueError, match=r"'galore_adafactor' \(GaLoreAdafactor\) has no betas; .*beta1="):
        integ.lowrank_optimizer("galore_adafactor", target_modules=["attn"], lr=1e-3, betas=(0.9, 0.999))
    with pytest.raises(ValueError, match=r"takes eps as Adafactor's pair \(eps1, eps2\)"):
        integ.lowrank_optimizer("galore_adafactor", target_modules=["attn"], lr=1e-3, eps=1e-8)
    with pytest.raises(ValueError, match="fixes relative_step=False"):
        integ.lowrank_optimizer("galore_adafactor", target_modules=["attn"], lr=1e-3, relative_step=True)
    with pytest.raises(ValueError, match="decay_rate must be a float <= 0"):
        integ.lowrank_optimizer("galore_adafactor", target_modules=["attn"], lr=1e-3, optim_args="decay_rate=0.5")
    # scale_parameter is only a default: it may be overridden
    model = tiny_llama()
    f, kw = integ.lowrank_optimizer("galore_adafactor", target_modules=["attn"], optim_args="rank=8", lr=1e-3,
                                    scale_parameter=True)
    assert all(g["scale_parameter"] is True and "betas" not in g for g in f()(model, **kw).param_groups)


def test_galore_adamw_8bit_trains_and_resumes(tmp_path):
    """``galore_adamw_8bit``: GaLoreAdamW with moment_bits=8 (min_8bit_size=0 here: the tiny model's
    moments are all below the 4096-element default). Every moment is 8-bit, the Trainer's
    weights_only checkpoint holds the uint8 codes and float32 absmax, and resuming from it is
    bit-identical to the uninterrupted run."""
    pair = integ.lowrank_optimizer("galore_adamw_8bit", target_modules=["attn", "mlp"],
                                   optim_args="rank=8,update_proj_gap=5", lr=1e-2, weight_decay=0.01, min_8bit_size=0)
    full, trainer = train(tmp_path / "full", pair)
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, GaLoreAdamW)
    assert all(g["moment_bits"] == 8 and g["min_8bit_size"] == 0 for g in opt.param_groups)
    states = [opt.state[p] for g in opt.param_groups for p in g["params"]]
    assert states and all(st["exp_avg"].dtype == torch.uint8 and st["exp_avg_sq"].dtype == torch.uint8
                          and st["exp_avg_absmax"].dtype == torch.float32 for st in states)
    saved = torch.load(tmp_path / "full" / "checkpoint-10" / "optimizer.pt", weights_only=True)
    assert any(v.dtype == torch.uint8 for st in saved["state"].values() for v in st.values()
               if isinstance(v, torch.Tensor))
    resumed, _ = train(tmp_path / "full", pair, resume=str(tmp_path / "full" / "checkpoint-10"))
    _assert_same(_weights(resumed), _weights(full))
    init = _weights(tiny_llama())
    w = _weights(full)
    assert all(torch.isfinite(w[n]).all() and not torch.equal(init[n], w[n]) for n in w)
    # the default min_8bit_size keeps these small moments float32
    f, kw = integ.lowrank_optimizer("galore_adamw_8bit", target_modules=["attn"], optim_args="rank=8", lr=1e-3)
    assert all(g["moment_bits"] == 8 and g["min_8bit_size"] == 4096 for g in f()(tiny_llama(), **kw).param_groups)


def test_owlore_callback_with_lowrank_optimizer(tmp_path):
    """OwLore through the Trainer door: lowrank_optimizer's factory + owlore_callback; the
    sampler attaches the Trainer-built optimizer, frozen layers never move, and under
    state="drop" only the active layer keeps state."""
    tf = pytest.importorskip("transformers")
    from lowrank_kernels.integrations.transformers import lowrank_optimizer
    from lowrank_kernels.owlore import LayerSampler, owlore_callback

    model = tiny_llama()
    sampler = LayerSampler(model.model.layers, None, gamma=1, period=100, seed=3, state="drop")
    pair = lowrank_optimizer("galore_adamw", target_modules=["attn", "mlp"], optim_args="rank=4,update_proj_gap=2",
                             lr=1e-2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(model, tmp_path, pair, max_steps=4, save_strategy="no")
    trainer.add_callback(owlore_callback(sampler))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert sampler.optimizer is trainer.optimizer or sampler.optimizer is getattr(trainer.optimizer, "optimizer", None)
    (active,) = sampler.active
    for l, layer in enumerate(model.model.layers):
        moved = any(not torch.equal(q, start[f"model.layers.{l}.{n}"]) for n, q in layer.named_parameters())
        assert moved == (l == active), l
        has_state = bool(sampler.optimizer.state.get(layer.mlp.up_proj.weight))
        assert has_state == (l == active), l
    assert not torch.equal(model.model.embed_tokens.weight, start["model.embed_tokens.weight"])  # always trains
