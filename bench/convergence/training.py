"""The model, the schedule, one training run, and what it measures (state bytes, peak memory, tokens/s)."""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import math
import resource
import sys
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from lowrank_kernels.optim import state_nbytes

from .data import Batches
from .presets import Preset
from .recipes import RECIPES


def build_model(preset: Preset, seed: int, device: torch.device) -> torch.nn.Module:
    """A tiny LlamaForCausalLM (vocab 256), built offline from a config, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
                      num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
                      num_key_value_heads=preset.heads, max_position_embeddings=preset.seq_len,
                      tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(device)


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def lr_lambda(preset: Preset, steps: int) -> Callable[[int], float]:
    """Linear warmup from 0, then cosine decay to ``min_lr_ratio`` of the peak (GaLore's schedule)."""
    warmup = max(1, int(round(preset.warmup_frac * steps)))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return preset.min_lr_ratio + (1 - preset.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Deprecated: :func:`lowrank_kernels.optim.state_nbytes` (the one state counter)."""
    warnings.warn("bench.convergence.state_bytes is deprecated; use lowrank_kernels.optim.state_nbytes",
                  DeprecationWarning, stacklevel=2)
    return state_nbytes(optimizer)


# --------------------------------------------------------------------------- memory

def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak bytes over a region: CUDA max allocated, or CPU peak-RSS growth (see the package doc)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda"
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS
            self.kind = "hwm"
            self.base = _proc_status("VmRSS")
        except OSError:
            self.kind = "maxrss"
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def peak(self) -> int:
        if self.kind == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "hwm":
            return max(0, (_proc_status("VmHWM") or 0) - (self.base or 0))
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base)

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------- runs

@dataclasses.dataclass
class Result:
    """One training run of one method with one seed."""

    method: str
    status: str  # "ok", "diverged at step N", "unavailable: ...", "failed: ..."
    final_val_loss: float = float("nan")  # on the split the run evaluated (validation, or tuning)
    state_bytes: int = 0
    peak_bytes: int = 0
    tokens_per_s: float = 0.0
    curve: list = dataclasses.field(default_factory=list)  # [(step, loss on the evaluated split)]
    seconds: float = 0.0
    recipe: dict = dataclasses.field(default_factory=dict)  # the hyper-parameters it ran with
    seed: int = 0

    @property
    def val_ppl(self) -> float:
        return math.exp(self.final_val_loss) if math.isfinite(self.final_val_loss) else float("nan")

    @property
    def trained(self) -> bool:
        return bool(self.curve) and not self.status.startswith(("unavailable", "failed"))


def _autocast(device: torch.device, preset: Preset):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=preset.autocast_bf16 and device.type == "cuda")


@torch.no_grad()
def evaluate(model, batches: Batches, device, preset) -> float:
    """Mean loss over the held-out windows of ``batches``."""
    total = 0.0
    n = 0
    for b in batches.val_batches():
        with _autocast(device, preset):
            total += lm_loss(model, b.to(device)).item()
        n += 1
    return total / n


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(preset: Preset, batches: Batches, device: torch.device, seed: int) -> None:
    """One throwaway training step before any measurement, so that lazy imports and the
    libraries' one-time buffers are not charged to the first method's peak memory."""
    model = build_model(preset, seed, device)
    with _autocast(device, preset):
        lm_loss(model, batches.train_batch(0).to(device)).backward()
    evaluate(model, batches, device, preset)
    del model
    gc.collect()


def train_one(method: str, preset: Preset, batches: Batches, device: torch.device, seed: int,
              recipe: dict, progress: bool = True) -> Result:
    """Train ``method`` (a key of ``RECIPES``) with hyper-parameters ``recipe`` from the
    ``seed``-initialized weights over ``preset.steps`` steps, evaluating on ``batches``' held-out split."""
    from tqdm.auto import tqdm

    spec = RECIPES[method]
    t_start = time.perf_counter()
    with PeakMemory(device) as mem:
        model = build_model(preset, seed, device)
        optimizer = spec.build(model, preset, recipe)
        callback = spec.callback(model, optimizer, preset, recipe) if spec.callback else None
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(preset, preset.steps))
        curve = [(0, evaluate(model, batches, device, preset))]
        train_time = 0.0
        status = "ok"
        bar = tqdm(range(preset.steps), desc=f"{method:>11} s{seed}", disable=not progress, leave=True,
                   dynamic_ncols=True, file=sys.stderr)
        for step in bar:
            batch = batches.train_batch(step).to(device)
            _sync(device)
            t0 = time.perf_counter()
            with _autocast(device, preset):
                loss = lm_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if callback is not None:
                callback(step)
            scheduler.step()
            _sync(device)
            train_time += time.perf_counter() - t0
            done = step + 1
            if done % preset.eval_every == 0 or done == preset.steps:
                val = evaluate(model, batches, device, preset)
                curve.append((done, val))
                bar.set_postfix(train=f"{loss.item():.3f}", val=f"{val:.3f}")
                if not math.isfinite(val):
                    status = f"diverged at step {done}"
                    break
        bar.close()
        peak = mem.peak()
        sbytes = state_nbytes(optimizer)
    tokens = len(curve) and (curve[-1][0] * preset.batch_size * preset.seq_len)
    res = Result(method, status, final_val_loss=curve[-1][1], state_bytes=sbytes, peak_bytes=peak,
                 tokens_per_s=tokens / train_time if train_time > 0 else 0.0, curve=curve,
                 seconds=time.perf_counter() - t_start, recipe=dict(recipe), seed=seed)
    del model, optimizer, scheduler
    gc.collect()
    return res
