"""The memory planner (``python -m lowrank_kernels.memory``): its meta-device figures equal
what a real first step allocates, and its table and CSV are sane."""
import csv
import math

import pytest
import torch

from lowrank_kernels import memory as M

ALL = list(M.METHODS)

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2,
            rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=64)
RANK = 8


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(**TINY)


def real_first_step(name, dtype, layerwise):
    """A tiny LLaMA on the CPU, one real forward/backward and one real optimizer step."""
    torch.manual_seed(0)
    model = M.build_model(tiny_config(), dtype, "cpu")
    method = M.METHODS[name]
    if method.prepare is not None:
        method.prepare(model)
    opt = M.build_optimizer(name, model, RANK, layerwise)
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if not layerwise:  # layer-wise optimizers stepped inside backward
        opt.step()
    return model, opt


def layout(model, opt):
    """{(param name, state key): (shape, dtype)} over every (per-parameter) optimizer."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for o in M.optimizers_of(opt):
        for p, st in o.state.items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    out[(names[id(p)], k)] = (tuple(v.shape), v.dtype)
    return out


def meta_first_step(name, dtype, layerwise):
    model = M.build_model(tiny_config(), dtype, "meta")
    method = M.METHODS[name]
    with M.meta_step_seams():
        if method.prepare is not None:
            method.prepare(model)
        M.give_gradients(model)
        opt = M.build_optimizer(name, model, RANK, layerwise, skip_nonfinite=False)
        M.step_once(opt)
    return model, opt


CASES = [(n, torch.float32, False) for n in ALL] + [
    ("adamw", torch.bfloat16, False), ("galore", torch.bfloat16, False), ("apollo", torch.bfloat16, False),
    ("qgalore", torch.bfloat16, False), ("galore", torch.float32, True), ("adamw", torch.float32, True),
    ("dct", torch.float32, True),
]


@pytest.mark.parametrize("name,dtype,layerwise", CASES, ids=[f"{n}-{str(d)[6:]}{'-lw' if lw else ''}" for n, d, lw in CASES])
def test_meta_state_equals_real_first_step(name, dtype, layerwise):
    real_model, real_opt = real_first_step(name, dtype, layerwise)
    meta_model, meta_opt = meta_first_step(name, dtype, layerwise)
    real_layout, meta_layout = layout(real_model, real_opt), layout(meta_model, meta_opt)
    assert real_layout, "the real step created no state"
    assert meta_layout == real_layout
    real_bytes = M.state_nbytes(real_opt)
    # independent count on the real tensors: each state tensor's own bytes (no storage is shared)
    own = sum(v.numel() * v.element_size() for o in M.optimizers_of(real_opt) for s in o.state.values()
              for v in s.values() if isinstance(v, torch.Tensor))
    assert real_bytes == own
    row = M.plan_one(name, tiny_config(), RANK, dtype, layerwise)
    assert row.optimizer_state == real_bytes
    assert row.weights == M.weights_nbytes(real_model)
    assert row.total == row.weights + row.gradients + row.optimizer_state
    if name != "adamw":
        assert row.projected == 4 * TINY["num_hidden_layers"] + 3 * TINY["num_hidden_layers"]


def test_gradients_and_weights_figures():
    cfg = tiny_config()
    model = M.build_model(cfg, torch.float32, "cpu")
    params = [p for p in model.parameters()]
    numel = sum(p.numel() for p in params)
    row = M.plan_one("adamw", cfg, RANK, torch.float32, False)
    assert row.gradients == 4 * numel
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert row.weights == 4 * numel + buffers
    # adamw: two float32 moments per parameter + one float32 step counter each
    assert row.optimizer_state == 2 * 4 * numel + 4 * len(params)
    lw = M.plan_one("adamw", cfg, RANK, torch.float32, True)
    assert lw.gradients == 4 * max(p.numel() for p in params)
    bf = M.plan_one("adamw", cfg, RANK, torch.bfloat16, False)
    assert bf.optimizer_state == 2 * 2 * numel + 4 * len(params)  # moments follow the parameter dtype


def test_qgalore_weights_are_int8():
    cfg = tiny_config()
    model = M.build_model(cfg, torch.float32, "cpu")
    row = M.plan_one("qgalore", cfg, RANK, torch.float32, False)
    expected = 0
    for name, p in model.named_parameters():
        if p.dim() == 2 and ("attn" in name or "mlp" in name):
            # INT8 values + float32 scale and minimum per group of 256 + a one-element placeholder
            expected += p.numel() + 8 * math.ceil(p.numel() / 256) + 4
        else:
            expected += 4 * p.numel()
    expected += sum(b.numel() * b.element_size() for b in model.buffers())
    assert row.weights == expected
    assert "INT8" in row.notes


def _galore_expected(cfg, rank, esize):
    """GaLoreAdamW's first-step state from the shapes (independent of the optimizer code):
    projector in the weights' dtype, moments in float32 (the default, also for 16-bit weights)."""
    mesize = max(esize, 4)
    model = M.build_model(cfg, torch.float32, "meta")
    total = 0
    for name, p in model.named_parameters():
        if p.dim() == 2 and ("attn" in name or "mlp" in name) and min(p.shape) > rank:
            m, n = p.shape
            low = m * rank if m >= n else rank * n  # std: projector on the smaller side
            proj = rank * n if m >= n else m * rank
            total += 2 * low * mesize + proj * esize + 4 + 1  # moments, projector, step, side
        else:
            total += 2 * p.numel() * mesize + 4
    return total


def test_cli_preset_table_and_csv(tmp_path, capsys):
    out = tmp_path / "plan.csv"
    assert M.main(["--model-preset", "llama-60m", "--optimizers", "adamw,galore,apollo-mini", "--rank", "128",
                   "--dtype", "bf16", "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "llama-60m" in text and "galore" in text and "state/adamw" in text
    rows = {r["optimizer"]: r for r in csv.DictReader(open(out))}
    assert set(rows) == {"adamw", "galore", "apollo-mini"}
    cfg = M.preset_config("llama-60m")
    numel = sum(p.numel() for p in M.build_model(cfg, torch.bfloat16, "meta").parameters())
    assert 55e6 < numel < 60e6  # GaLore's "60M"
    assert int(rows["adamw"]["optimizer_state"]) == 2 * 2 * numel + 4 * 75
    assert int(rows["galore"]["optimizer_state"]) == _galore_expected(cfg, 128, 2)
    assert int(rows["apollo-mini"]["optimizer_state"]) < int(rows["galore"]["optimizer_state"])
    for r in rows.values():
        assert int(r["total"]) == int(r["weights"]) + int(r["gradients"]) + int(r["optimizer_state"])
        assert r["dtype"] == "bf16" and r["rank"] == "128"


def test_config_json(tmp_path, capsys):
    import json

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], **TINY}))
    assert M.main(["--config", str(path), "--optimizers", "galore", "--rank", str(RANK)]) == 0
    assert "galore" in capsys.readouterr().out
    row = M.plan(M.load_config(str(path)), ["galore"], RANK)[0]
    assert row.optimizer_state == _galore_expected(tiny_config(), RANK, 4)


def test_rank_too_large_is_reported():
    row = M.plan_one("galore", tiny_config(), 1000, torch.float32, False)
    assert row.projected == 0 and "no weight projected" in row.notes


def test_bad_arguments():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        M.plan(cfg, ["galore", "sgd"], RANK)
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        M.plan(cfg, ["galore"], 0)
    with pytest.raises(TypeError, match="dtype"):
        M.plan(cfg, ["galore"], RANK, dtype=torch.int8)
    with pytest.raises(ValueError, match="model preset"):
        M.preset_config("llama-13b")
    with pytest.raises(SystemExit):
        M.main(["--model-preset", "llama-60m", "--optimizers", "adamw,nope"])


def test_seams_restore_torch():
    gen = torch.Generator
    with M.meta_step_seams():
        assert torch.Generator(device="meta").device.type == "cpu"
    assert torch.Generator is gen
    with pytest.raises(Exception):
        bool(torch.ones((), device="meta"))  # outside the seams a meta value read still raises


BITS_CASES = [("galore", 8, torch.float32), ("dct", 8, torch.float32), ("apollo", 8, torch.float32),
              ("frugal", 8, torch.float32), ("gradnormlorp", 8, torch.float32), ("qgalore", 8, torch.float32),
              ("galore", 16, torch.bfloat16), ("apollo", 16, torch.bfloat16)]


@pytest.mark.parametrize("name,bits,dtype", BITS_CASES, ids=[f"{n}-{b}" for n, b, _ in BITS_CASES])
def test_moment_bits_state_equals_real_first_step(name, bits, dtype):
    """plan(moment_bits=8|16): the meta step's state equals a real first step's with the same
    group key (8-bit: the embedding / lm_head moments (8192 elements) become uint8 codes plus
    float32 absmax, the small low-rank ones stay float32 below min_8bit_size; 16-bit: bf16)."""
    torch.manual_seed(0)
    real = M.build_model(tiny_config(), dtype, "cpu")
    method = M.METHODS[name]
    if method.prepare is not None:
        method.prepare(real)
    opt = M.build_optimizer(name, real, RANK, moment_bits=bits)
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    real(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    row = M.plan_one(name, tiny_config(), RANK, dtype, False, moment_bits=bits)
    assert row.optimizer_state == M.state_nbytes(opt)
    want = torch.uint8 if bits == 8 else torch.bfloat16
    dtypes = {v.dtype for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")}
    assert want in dtypes
    base = M.plan_one(name, tiny_config(), RANK, dtype, False)
    assert row.optimizer_state < base.optimizer_state
    assert f"moment_bits={bits}" in row.notes
    with pytest.raises(ValueError, match="moment_bits must be 32, 16 or 8"):
        M.plan(tiny_config(), [name], RANK, moment_bits=4)
