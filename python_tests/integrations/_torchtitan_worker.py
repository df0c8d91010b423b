"""What the torchtitan test runs in each of its 2 gloo processes (CPU).

torchtitan's own trainer does not run on a CPU (its llama3 debug model attends with
FlexAttention, which has no CPU backward, and its device falls back to CUDA), so this
drives the parts of torchtitan a job uses around the optimizer, as its trainer does:
``LowRankOptimizersContainer`` built from a job's optimizer config over the model parts,
``LRSchedulersContainer`` (warm-up + cosine) and ``CheckpointManager`` (DCP), on a small
model with the debug model's parameter names and shapes, FSDP2-sharded (``fully_shard``
per block, then the root).
"""
from __future__ import annotations

import traceback
import warnings

import torch
import torch.distributed as dist
from torch import nn

from .._dist import rank_session

DIM, HIDDEN, VOCAB, LAYERS, SEQ, BATCH = 64, 192, 128, 2, 8, 4
GAP = 2  # refreshes at steps 1, 3, 5
STEPS, SAVE_AT = 5, 3


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv_linear = nn.Module()
        self.qkv_linear.wqkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.wo = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x):  # a causal mixing stand-in for attention (values only)
        q, k, v = self.qkv_linear.wqkv(x).chunk(3, dim=-1)
        w = torch.softmax((q @ k.transpose(-1, -2)) / DIM ** 0.5 + torch.full((x.shape[1], x.shape[1]), float("-inf"))
                          .triu(1), dim=-1)
        return self.wo(w @ v)


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Linear(DIM, HIDDEN, bias=False), nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention, self.feed_forward = Attention(), FeedForward()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(DIM), nn.RMSNorm(DIM)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Model(nn.Module):
    """The llama3 debug model's parameter names (``tok_embeddings``, ``layers.<i>.attention.
    qkv_linear.wqkv``, ``feed_forward.w1/w2/w3``, norms, ``lm_head``), smaller."""

    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleDict({str(i): Block() for i in range(LAYERS)})
        self.norm = nn.RMSNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h)
        return self.lm_head(self.norm(h))


def build(folder):
    """Model parts, optimizers, LR schedulers and checkpointer, as torchtitan's trainer builds them."""
    from torch.distributed.fsdp import fully_shard
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer

    from lowrank_kernels.integrations.torchtitan import lowrank_optimizer_config

    torch.manual_seed(0)
    model = Model()
    for block in model.layers.values():
        fully_shard(block)
    fully_shard(model)
    cfg = lowrank_optimizer_config("GaLoreAdamW", lr=1e-2, weight_decay=0.1, rank=8, update_proj_gap=GAP, scale=0.5,
                                   projector="exact", target_modules=("attention", "feed_forward"), moment_bits=8,
                                   min_8bit_size=0, block_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizers = cfg.build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_type="cosine").build(
        optimizers=optimizers, training_steps=STEPS)
    ckpt = CheckpointManager(CheckpointManager.Config(enable=True, folder="ckpt", interval=SAVE_AT),
                             dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
                             states={}, sd_adapter=None, base_folder=folder)
    return model, optimizers, schedulers, ckpt


def batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)


def train_step(model, optimizers, schedulers, step, rank):
    """One step of torchtitan's trainer loop (zero_grad, forward-backward, step, LR step)."""
    tokens = batch(step, rank)
    optimizers.zero_grad()
    logits = model(tokens[:, :-1])
    nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    optimizers.step()
    schedulers.step()


def snapshot(model, optimizers):
    from torch.distributed.tensor import DTensor

    def loc(t):
        return t.to_local() if isinstance(t, DTensor) else t

    out = {f"param.{n}": loc(p).detach().clone() for n, p in model.named_parameters()}
    for opt in optimizers:
        names = {p: n for g in opt.param_groups for p, n in zip(g["params"], g["param_names"])}
        for p, st in opt.state.items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    out[f"state.{names[p]}.{k}"] = loc(v).detach().clone()
        out["lr"] = torch.tensor([g["lr"] for g in opt.param_groups], dtype=torch.float64)
    return out


def same(a, b):
    bad = [k for k in a if k not in b or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    return (not bad and sorted(a) == sorted(b)), bad[:5] + sorted(set(a) ^ set(b))[:5]


class SVDCount:
    def __enter__(self):
        self.n, self._svd = 0, torch.linalg.svd

        def counted(*a, **k):
            self.n += 1
            return self._svd(*a, **k)

        torch.linalg.svd = counted
        return self

    def __exit__(self, *exc):
        torch.linalg.svd = self._svd


def worker(rank, ws, port, outdir):
    from lowrank_kernels.optim import GaLoreAdamW

    with rank_session(rank, ws, port, outdir) as results:
        folder = f"{outdir}/run"
        try:
            # An uninterrupted run, saving at step SAVE_AT; plus what the first steps leave.
            model, opts, scheds, ckpt = build(folder)
            kinds = sorted({type(o).__name__ for o in opts})
            groups = [(len(g["params"]), g.get("rank")) for o in opts for g in o.param_groups]
            results["container"] = [kinds == ["GaLoreAdamW"] and groups == [(5 * LAYERS, 8), (2 * LAYERS + 3, None)],
                                    {"optimizers": kinds, "groups": groups}]
            first = None
            for t in range(1, STEPS + 1):
                train_step(model, opts, scheds, t, rank)
                ckpt.save(curr_step=t)
                if t == 1:
                    first = snapshot(model, opts)
            ckpt.maybe_wait_for_saving()
            full = snapshot(model, opts)
            ckpt.close()
            dist.barrier()

            # Resume from the step-SAVE_AT checkpoint in a fresh job; the loader creates the state
            # first (init_state: no SVD of a zero gradient), then continue.
            model, opts, scheds, ckpt = build(folder)
            with SVDCount() as count:
                loaded = ckpt.load(step=SAVE_AT)
            for t in range(SAVE_AT + 1, STEPS + 1):
                train_step(model, opts, scheds, t, rank)
            ok, bad = same(snapshot(model, opts), full)
            results["resume_bitwise"] = [loaded and ok and count.n == 0, {"loaded": loaded, "differ": bad,
                                                                         "svds_while_loading": count.n}]
            ckpt.close()

            # A job that checkpoints (or reads its optimizer state) before its first step: the
            # container's state creation computes no projector and the first real step refreshes,
            # so the run equals one that never did.
            model, opts, scheds, ckpt = build(f"{outdir}/other")
            with SVDCount() as count:
                opts.state_dict()
            steps_after = [float(st["step"]) for o in opts for st in o.state.values()]
            train_step(model, opts, scheds, 1, rank)
            ok, bad = same(snapshot(model, opts), first)
            results["init_then_train"] = [ok and count.n == 0 and set(steps_after) == {0.0},
                                          {"differ": bad, "svds": count.n, "steps": sorted(set(steps_after))}]
            ckpt.close()
            results["class"] = [isinstance(next(iter(opts)), GaLoreAdamW), type(opts).__name__]
        except Exception:
            results["error"] = [False, traceback.format_exc()]
        dist.barrier()
