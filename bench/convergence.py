"""``python -m bench.convergence``: pre-train a small LLaMA on real text with every optimizer.

Every method trains the same model (transformers' ``LlamaForCausalLM`` built from a
tiny ``LlamaConfig``, vocab 256 = bytes, never downloaded) from the same initial
weights, on the same batches in the same order, under the same schedule (linear
warmup then cosine decay to 10% of the peak learning rate, as in the GaLore
scripts). Only the optimizer and its paper recipe (learning rate, scale, rank, gap)
change. Low-rank projection applies to the attention and MLP weights only, chosen by
:func:`lowrank_kernels.optim.lowrank_param_groups`; embeddings, the LM head and the
norms get plain AdamW inside each optimizer.

Data: by default the Python standard library's own ``*.py`` files (present on every
machine), read as bytes in sorted order; a file goes to validation when the CRC32 of
its path relative to the stdlib root is 0 mod 20, so the split does not depend on
which other files exist. ``--data PATH`` takes a text file (last 10% = validation) or
a folder (every regular file, same CRC rule) instead.

Output: a progress bar per method, a table (final validation loss and perplexity,
optimizer-state bytes, peak memory, training tokens/s), ``<out>/convergence.csv``
with exactly the columns ``method,final_val_loss,val_ppl,state_bytes,peak_bytes,
tokens_per_s``, ``<out>/convergence.png`` (validation loss vs step) and
``<out>/convergence.json`` (configuration, device, curves).

What is measured:

- ``state_bytes``: the sum of ``numel * element_size`` of every tensor held in
  ``optimizer.state`` (moments, projectors or indices or seeds, step counters); for
  low-rank methods this includes the full AdamW state of the non-projected params.
- ``peak_bytes``: on CUDA, ``torch.cuda.max_memory_allocated`` after a reset, with the
  model built after the reset (weights + gradients + activations + optimizer state +
  temporaries). On CPU (Linux), the growth of the process's peak resident set
  (``VmHWM``, reset per method through ``/proc/self/clear_refs`` after ``malloc_trim``)
  over its resident set just before the model is built: the same things, measured
  in pages the allocator touched, so it is coarser than the CUDA figure. Where
  ``/proc/self/clear_refs`` is unavailable, the ``ru_maxrss`` growth is reported (0
  when an earlier method peaked higher).
- ``tokens_per_s``: training tokens divided by the wall time of the training steps
  (forward, backward, optimizer step, scheduler), evaluations excluded.

A method whose optimizer cannot be imported is listed as ``unavailable: <reason>``
and left out of the CSV; one that raises while training is listed as ``failed`` and
the command exits with status 1.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import math
import os
import pathlib
import resource
import subprocess
import sys
import sysconfig
import time
import zlib
from typing import Callable

# Spinning OpenMP waiters make a CPU shared with other jobs many times slower; set
# before torch loads (effective for ``python -m bench.convergence``).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

METHODS = ("adamw", "galore", "dct", "qgalore", "apollo", "apollo-mini", "frugal")
CSV_COLUMNS = ("method", "final_val_loss", "val_ppl", "state_bytes", "peak_bytes", "tokens_per_s")
# Attention and MLP linears of LlamaForCausalLM live under "...self_attn.*" / "...mlp.*".
TARGET_MODULES = ("attn", "mlp")


@dataclasses.dataclass(frozen=True)
class Preset:
    """Model size, data shape and schedule of one run (identical for every method)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    seq_len: int
    batch_size: int
    steps: int
    warmup_frac: float
    eval_every: int
    eval_batches: int
    rank: int  # low-rank methods except APOLLO-Mini (rank 1)
    gap: int  # update_proj_gap of every low-rank method
    adamw_lr: float  # peak lr of the AdamW baseline (and of FRUGAL, which follows it)
    min_lr_ratio: float = 0.1
    autocast_bf16: bool = False


PRESETS = {
    # CPU default. hidden 128, 4 layers: the attention and MLP weights hold 92% of the
    # 0.86M parameters (as in LLaMA, where embeddings are a small share); rank 32 =
    # hidden/4, the GaLore paper's ratio (60M: hidden 512, rank 128). The run is 100x
    # shorter than the paper's, so the projector refresh gap shrinks with it (200 of
    # 10k steps in the paper; here 50 of 400, i.e. 8 subspaces per run).
    # CPU default. hidden 128, 4 layers: the attention and MLP weights hold 92% of the
    # 0.86M parameters (as in LLaMA, where embeddings are a small share); rank 32 =
    # hidden/4, the GaLore paper's ratio (60M: hidden 512, rank 128). The run is ~40x
    # shorter than the paper's, so the projector refresh gap shrinks with it (200 of
    # 10k steps in the paper; here 40 of 240, i.e. 6 subspaces per run).
    "quick": Preset("quick", hidden=128, intermediate=344, layers=4, heads=4, seq_len=64,
                    batch_size=16, steps=240, warmup_frac=0.1, eval_every=20, eval_batches=8,
                    rank=32, gap=40, adamw_lr=1.5e-3),
    # GaLore paper's LLaMA-60M (hidden 512, MLP 1376, 8 heads, 8 layers, seq 256, rank
    # 128, gap 200, AdamW lr 1e-3), trained for 500 steps of 64 x 256 tokens in bf16
    # autocast: a short slice of the paper's 10k-step run, about 2 minutes for all seven
    # methods on an H100.
    "gpu": Preset("gpu", hidden=512, intermediate=1376, layers=8, heads=8, seq_len=256,
                  batch_size=64, steps=500, warmup_frac=0.1, eval_every=50, eval_batches=8,
                  rank=128, gap=200, adamw_lr=1e-3, autocast_bf16=True),
    # For the test suite: a few seconds on a CPU.
    "tiny": Preset("tiny", hidden=64, intermediate=172, layers=2, heads=2, seq_len=32,
                   batch_size=8, steps=12, warmup_frac=0.125, eval_every=6, eval_batches=2,
                   rank=16, gap=8, adamw_lr=3e-3),
}

# Per-method recipe: peak learning rate and the method's own knobs. Paper values where
# they carry over to a small model; see ALGORITHMS.md and the README for the sources.
RECIPES: dict[str, dict] = {
    # AdamW: the preset's adamw_lr. GaLore paper: 1e-3 for LLaMA-60M (the gpu preset).
    # Quick preset: the best of a sweep {5e-4, 1e-3, 1.5e-3, 3e-3, 6e-3, 1e-2, 2e-2} on
    # the quick run itself (final val loss 2.47 / 2.23 / 2.21 / 2.39 / 2.53 / 2.68 /
    # 2.73 in that order), so the baseline is not handicapped. Higher AdamW rates stall
    # on the ~3.0 plateau (unigram statistics) for most of the run. The low-rank recipes
    # beat this baseline mostly through their lr of 0.01 on the params they leave to
    # plain AdamW (embeddings, LM head, norms): ``--adamw-other-lr 1e-2`` gives AdamW
    # 1.958 on the quick run (vs 2.215), level with GaLore's 1.935.
    "adamw": dict(lr="adamw"),
    # GaLore paper: lr 0.01, scale 0.25, rank 1/4 of hidden, gap 200.
    "galore": dict(lr=1e-2, scale=0.25),
    # DCT-AdamW: GaLore's recipe with the DCT projector (the paper reuses GaLore's setup).
    "dct": dict(lr=1e-2, scale=0.25),
    # Q-GaLore: GaLore's lr and scale with the INT4 projector and INT8 weights.
    "qgalore": dict(lr=1e-2, scale=0.25),
    # APOLLO paper: lr 0.01, scale 1, channel-wise, rank 1/4 of the dimension.
    "apollo": dict(lr=1e-2, scale=1.0),
    # APOLLO-Mini: lr 0.01, rank 1, tensor-wise, scale 128 at LLaMA-60M (hidden 512).
    # With rank 1 the tensor-wise factor makes the update norm ~ sqrt(scale / n) of
    # Adam's (n = min(m, n) = hidden for LLaMA linears), which is why APOLLO raises the
    # scale for larger models; keeping that ratio gives scale = 128 * hidden / 512
    # (32 for the quick preset, 128 for the gpu preset). With the paper's 128 at
    # hidden 128 the quick run spikes at step 40 and ends at 2.40 (+8.4% vs AdamW);
    # with 32 it ends at 2.06.
    "apollo-mini": dict(lr=1e-2, scale="128*hidden/512"),
    # FRUGAL paper: AdamW's lr for the state-full part, density 0.25, signSGD on the
    # residual with inactive_lr_scale 1.0 (pre-training).
    "frugal": dict(lr="adamw", density=0.25, inactive_lr_scale=1.0),
}


# ----------------------------------------------------------------------------- data

def _stdlib_files() -> tuple[pathlib.Path, list[pathlib.Path]]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = sorted(f for f in root.rglob("*.py")
                   if f.is_file() and not skip & set(f.relative_to(root).parts))
    return root, files


def _is_validation(relpath: str) -> bool:
    return zlib.crc32(relpath.replace(os.sep, "/").encode()) % 20 == 0


def load_corpus(path: str | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Return ``(train_bytes, val_bytes, description)`` as uint8 tensors.

    ``path=None``: the stdlib's ``*.py`` files; a file: its last 10% is validation;
    a folder: every regular file below it, split by the CRC rule of the module doc.
    """
    if path is None:
        root, files = _stdlib_files()
        desc = f"Python {sys.version.split()[0]} stdlib *.py ({root})"
    else:
        p = pathlib.Path(path)
        if not p.exists():
            raise FileNotFoundError(f"--data: {path!r} does not exist")
        if p.is_file():
            data = p.read_bytes()
            cut = int(len(data) * 0.9)
            train, val = data[:cut], data[cut:]
            return _as_tensor(train, "training", path), _as_tensor(val, "validation", path), f"{p} (last 10% validation)"
        root = p
        files = sorted(f for f in p.rglob("*") if f.is_file())
        desc = f"{p} ({len(files)} files)"
    train, val = bytearray(), bytearray()
    for f in files:
        (val if _is_validation(str(f.relative_to(root))) else train).extend(f.read_bytes())
    if not val and train:  # a folder too small for the CRC rule: fall back to a tail split
        cut = int(len(train) * 0.9)
        train, val = train[:cut], train[cut:]
    return _as_tensor(bytes(train), "training", desc), _as_tensor(bytes(val), "validation", desc), desc


def _as_tensor(b: bytes, what: str, desc: str) -> torch.Tensor:
    if len(b) < 1024:
        raise ValueError(f"--data: the {what} split of {desc} has {len(b)} bytes; need at least 1024")
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


class Batches:
    """The same training windows, in the same order, for every method; fixed validation windows."""

    def __init__(self, train: torch.Tensor, val: torch.Tensor, preset: Preset, seed: int):
        self.train, self.val, self.p = train, val, preset
        win = preset.seq_len + 1
        if len(train) <= win or len(val) <= win:
            raise ValueError(f"data splits ({len(train)}, {len(val)} bytes) are shorter than one window of {win}")
        g = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, len(train) - win, (preset.steps, preset.batch_size), generator=g)
        n_val = preset.eval_batches * preset.batch_size
        self.val_offsets = torch.linspace(0, len(val) - win - 1, n_val).long()

    @staticmethod
    def _gather(stream: torch.Tensor, offsets: torch.Tensor, win: int) -> torch.Tensor:
        idx = offsets[:, None] + torch.arange(win)[None, :]
        return stream[idx].long()

    def train_batch(self, step: int) -> torch.Tensor:
        return self._gather(self.train, self.offsets[step], self.p.seq_len + 1)

    def val_batches(self):
        b = self.p.batch_size
        for i in range(self.p.eval_batches):
            yield self._gather(self.val, self.val_offsets[i * b:(i + 1) * b], self.p.seq_len + 1)


# ---------------------------------------------------------------------------- model

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


# ------------------------------------------------------------------------ optimizers

def _lowrank_groups(model, rank, gap, scale, **extra):
    from lowrank_kernels.optim import lowrank_param_groups

    return lowrank_param_groups(model, target_modules=TARGET_MODULES, rank=rank,
                                update_proj_gap=gap, scale=scale, **extra)


def _adamw(model, preset, r):
    other_lr = r.get("other_lr")
    if other_lr is None:
        return torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=0.0)
    # --adamw-other-lr: the parameters outside the attention/MLP linears (embeddings, LM
    # head, norms: what the low-rank methods leave to plain AdamW) get their own lr.
    target, other = [], []
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        (target if any(t in module for t in TARGET_MODULES) else other).append(p)
    return torch.optim.AdamW([{"params": target}, {"params": other, "lr": other_lr}],
                             lr=r["lr"], weight_decay=0.0)


def _galore(model, preset, r):
    from lowrank_kernels.optim import GaLoreAdamW

    return GaLoreAdamW(_lowrank_groups(model, preset.rank, preset.gap, r["scale"], proj_type="std"),
                       lr=r["lr"], weight_decay=0.0)


def _dct(model, preset, r):
    from lowrank_kernels.optim import DCTAdamW

    return DCTAdamW(_lowrank_groups(model, preset.rank, preset.gap, r["scale"], proj_type="std"),
                    lr=r["lr"], weight_decay=0.0)


def _qgalore(model, preset, r):
    from lowrank_kernels.nn import quantize_linear_layers
    from lowrank_kernels.optim import QGaLoreAdamW

    quantize_linear_layers(model, target_modules=TARGET_MODULES)
    return QGaLoreAdamW(_lowrank_groups(model, preset.rank, preset.gap, r["scale"], proj_type="std"),
                        lr=r["lr"], weight_decay=0.0)


def _apollo(model, preset, r):
    from lowrank_kernels.optim import APOLLOAdamW

    return APOLLOAdamW(_lowrank_groups(model, preset.rank, preset.gap, r["scale"], proj_type="std",
                                       scale_type="channel"),
                       lr=r["lr"], weight_decay=0.0)


def _apollo_mini(model, preset, r):
    from lowrank_kernels.optim import APOLLOAdamW

    return APOLLOAdamW.mini(_lowrank_groups(model, 1, preset.gap, r["scale"], proj_type="std",
                                            scale_type="tensor"),
                            lr=r["lr"], weight_decay=0.0)


def _frugal(model, preset, r):
    from lowrank_kernels.optim import FrugalAdamW

    # rank=None: the state-full rank comes from the density (round(0.25 * min(m, n))).
    return FrugalAdamW(_lowrank_groups(model, None, preset.gap, 1.0, proj_type="std", density=r["density"]),
                       lr=r["lr"], weight_decay=0.0, projection="svd", update="signsgd",
                       inactive_lr_scale=r["inactive_lr_scale"])


BUILDERS: dict[str, Callable] = {
    "adamw": _adamw, "galore": _galore, "dct": _dct, "qgalore": _qgalore,
    "apollo": _apollo, "apollo-mini": _apollo_mini, "frugal": _frugal,
}
# What must import for a method to run (checked before any training starts).
REQUIREMENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "adamw": (),
    "galore": (("lowrank_kernels.optim", "lowrank_param_groups"), ("lowrank_kernels.optim", "GaLoreAdamW")),
    "dct": (("lowrank_kernels.optim", "lowrank_param_groups"), ("lowrank_kernels.optim", "DCTAdamW")),
    "qgalore": (("lowrank_kernels.optim", "lowrank_param_groups"), ("lowrank_kernels.optim", "QGaLoreAdamW"),
                ("lowrank_kernels.nn", "quantize_linear_layers")),
    "apollo": (("lowrank_kernels.optim", "lowrank_param_groups"), ("lowrank_kernels.optim", "APOLLOAdamW")),
    "apollo-mini": (("lowrank_kernels.optim", "lowrank_param_groups"), ("lowrank_kernels.optim", "APOLLOAdamW")),
    "frugal": (("lowrank_kernels.optim", "lowrank_param_groups"), ("lowrank_kernels.optim", "FrugalAdamW")),
}


def why_unavailable(method: str) -> str | None:
    """``None`` when ``method``'s optimizer imports, else the reason."""
    import importlib

    for module, name in REQUIREMENTS[method]:
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any import failure makes the method unavailable
            return f"cannot import {module} ({type(e).__name__}: {e})"
        if not hasattr(mod, name):
            return f"{module}.{name} does not exist yet"
    if method == "apollo-mini":
        from lowrank_kernels.optim import APOLLOAdamW

        if not callable(getattr(APOLLOAdamW, "mini", None)):
            return "APOLLOAdamW.mini does not exist yet"
    return None


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Sum of the bytes of every tensor held in ``optimizer.state`` (nested containers included)."""
    seen: set[int] = set()

    def walk(x) -> int:
        if isinstance(x, torch.Tensor):
            if id(x) in seen:
                return 0
            seen.add(id(x))
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        return 0

    return sum(walk(s) for s in optimizer.state.values())


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
    """Peak bytes over a region: CUDA max allocated, or CPU peak-RSS growth (module doc)."""

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
    method: str
    status: str  # "ok", "diverged", "unavailable: ...", "failed: ..."
    final_val_loss: float = float("nan")
    state_bytes: int = 0
    peak_bytes: int = 0
    tokens_per_s: float = 0.0
    curve: list = dataclasses.field(default_factory=list)  # [(step, val_loss)]
    seconds: float = 0.0
    recipe: dict = dataclasses.field(default_factory=dict)  # the lr and knobs it ran with

    @property
    def val_ppl(self) -> float:
        return math.exp(self.final_val_loss) if math.isfinite(self.final_val_loss) else float("nan")


def _autocast(device: torch.device, preset: Preset):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=preset.autocast_bf16 and device.type == "cuda")


@torch.no_grad()
def evaluate(model, batches: Batches, device, preset) -> float:
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
    """Train ``method`` from the seeded initial weights over ``preset.steps`` steps."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    with PeakMemory(device) as mem:
        model = build_model(preset, seed, device)
        optimizer = BUILDERS[method](model, preset, recipe)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(preset, preset.steps))
        curve = [(0, evaluate(model, batches, device, preset))]
        train_time = 0.0
        status = "ok"
        bar = tqdm(range(preset.steps), desc=f"{method:>11}", disable=not progress, leave=True,
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
        sbytes = state_bytes(optimizer)
    tokens = len(curve) and (curve[-1][0] * preset.batch_size * preset.seq_len)
    res = Result(method, status, final_val_loss=curve[-1][1], state_bytes=sbytes, peak_bytes=peak,
                 tokens_per_s=tokens / train_time if train_time > 0 else 0.0, curve=curve,
                 seconds=time.perf_counter() - t_start, recipe=dict(recipe))
    del model, optimizer, scheduler
    gc.collect()
    return res


# --------------------------------------------------------------------------- output

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name or 'unknown'} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=pathlib.Path(__file__).resolve().parent, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def write_csv(results: list[Result], path: pathlib.Path) -> None:
    """One row per method that trained (unavailable/failed methods are left out)."""
    lines = [",".join(CSV_COLUMNS)]
    for r in results:
        if r.status.startswith(("unavailable", "failed")):
            continue
        lines.append(f"{r.method},{r.final_val_loss:.6f},{r.val_ppl:.6f},{r.state_bytes},{r.peak_bytes},{r.tokens_per_s:.1f}")
    path.write_text("\n".join(lines) + "\n")


def write_plot(results: list[Result], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in results:
        if r.curve:
            xs, ys = zip(*r.curve)
            ax.plot(xs, ys, marker=".", label=f"{r.method} ({r.final_val_loss:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(title, fontsize=9)
    finals = [r.final_val_loss for r in results if r.curve and math.isfinite(r.final_val_loss)]
    if finals:  # zoom on the part of the curves where the methods differ
        ax.set_ylim(min(finals) - 0.1, max(min(finals) + 1.5, max(finals) + 0.1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mb(b: int) -> str:
    return f"{b / 2**20:.2f}"


def format_table(results: list[Result]) -> str:
    base = next((r for r in results if r.method == "adamw" and r.curve), None)
    head = f"{'method':<12} {'val loss':>9} {'val ppl':>8} {'state MiB':>10} {'peak MiB':>9} {'tokens/s':>9}  {'loss vs adamw':>13} {'state vs adamw':>14}"
    out = [head, "-" * len(head)]
    for r in results:
        if not r.curve:
            out.append(f"{r.method:<12} {r.status}")
            continue
        rel_loss = rel_state = ""
        if base is not None and r is not base:
            rel_loss = f"{100 * (r.final_val_loss / base.final_val_loss - 1):+.1f}%"
            rel_state = f"{r.state_bytes / base.state_bytes:.2f}x" if base.state_bytes else ""
        line = (f"{r.method:<12} {r.final_val_loss:>9.4f} {r.val_ppl:>8.3f} {_mb(r.state_bytes):>10} "
                f"{_mb(r.peak_bytes):>9} {r.tokens_per_s:>9.0f}  {rel_loss:>13} {rel_state:>14}")
        if r.status != "ok":
            line += f"  ({r.status})"
        out.append(line)
    return "\n".join(out)


def acceptance(results: list[Result]) -> list[str]:
    """Issue 7's bar: final val loss within 5% of AdamW's and state at most half of AdamW's."""
    base = next((r for r in results if r.method == "adamw" and r.curve and math.isfinite(r.final_val_loss)), None)
    if base is None:
        return ["acceptance: no AdamW baseline in this run"]
    lines = []
    for r in results:
        if r is base or not r.curve:
            continue
        loss_ok = math.isfinite(r.final_val_loss) and r.final_val_loss <= 1.05 * base.final_val_loss
        state_ok = r.state_bytes <= 0.5 * base.state_bytes
        lines.append(f"{r.method:<12} loss {100 * (r.final_val_loss / base.final_val_loss - 1):+6.2f}% "
                     f"({'ok' if loss_ok else 'MISS'}, bar +5%), state {r.state_bytes / base.state_bytes:.2f}x "
                     f"({'ok' if state_ok else 'MISS'}, bar 0.50x)")
    return lines


# ------------------------------------------------------------------------------ CLI

def _parse_overrides(text: str | None, what: str) -> dict[str, float]:
    out: dict[str, float] = {}
    if not text:
        return out
    for item in text.split(","):
        if "=" not in item:
            raise SystemExit(f"--{what}: expected method=value, got {item!r}")
        k, v = item.split("=", 1)
        if k not in METHODS:
            raise SystemExit(f"--{what}: unknown method {k!r}; choose from {', '.join(METHODS)}")
        out[k] = float(v)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.convergence", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizers", default=",".join(METHODS),
                    help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per method (default: the preset's)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the CPU preset (default without CUDA)")
    mode.add_argument("--gpu", action="store_true", help="the GaLore LLaMA-60M preset (default with CUDA)")
    mode.add_argument("--preset", choices=sorted(PRESETS), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help="a text file or folder (default: the Python stdlib's *.py)")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results"),
                    help="output folder for convergence.csv/.png/.json (default: bench/results/)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", default=None, help="override peak learning rates, e.g. adamw=3e-3,galore=0.02")
    ap.add_argument("--scale", default=None, help="override scales, e.g. apollo-mini=64,galore=0.5")
    ap.add_argument("--adamw-other-lr", type=float, default=None,
                    help="AdamW's lr for the params outside attention/MLP (embeddings, LM head, norms); "
                         "default: AdamW's lr. The low-rank recipes give these params their lr (0.01)")
    ap.add_argument("--rank", type=int, default=None, help="override the preset's rank")
    ap.add_argument("--gap", type=int, default=None, help="override the preset's update_proj_gap")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's; 1 helps on a CPU shared with other jobs)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.optimizers.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        ap.error(f"--optimizers: unknown {bad or '(empty)'}; choose from {', '.join(METHODS)}")
    args.methods = methods
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be >= 1")
    return args


def run(argv=None) -> tuple[list[Result], pathlib.Path]:
    """Parse ``argv``, train every requested method, write the outputs; returns results and out dir."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = args.preset or ("gpu" if args.gpu else "quick" if args.quick else
                           ("gpu" if device.type == "cuda" else "quick"))
    preset = PRESETS[name]
    changes = {}
    if args.steps is not None:
        changes["steps"] = args.steps
        changes["eval_every"] = max(1, min(preset.eval_every, args.steps // 4 or 1))
    if args.rank is not None:
        changes["rank"] = args.rank
    if args.gap is not None:
        changes["gap"] = args.gap
    preset = dataclasses.replace(preset, **changes)
    lr_over = _parse_overrides(args.lr, "lr")
    scale_over = _parse_overrides(args.scale, "scale")

    train, val, desc = load_corpus(args.data)
    batches = Batches(train, val, preset, args.seed)
    dev = device_name(device)
    print(f"device: {dev}; torch {torch.__version__}")
    print(f"data: {desc}: {len(train):,} training / {len(val):,} validation bytes")
    print(f"preset {preset.name}: hidden {preset.hidden}, MLP {preset.intermediate}, {preset.layers} layers, "
          f"{preset.heads} heads, seq {preset.seq_len}, batch {preset.batch_size}, {preset.steps} steps, "
          f"rank {preset.rank}, gap {preset.gap}")

    warm_up(preset, batches, device, args.seed)
    results: list[Result] = []
    for m in args.methods:
        reason = why_unavailable(m)
        if reason is not None:
            results.append(Result(m, f"unavailable: {reason}"))
            print(f"{m}: unavailable: {reason}")
            continue
        recipe = dict(RECIPES[m])
        if recipe["lr"] == "adamw":
            recipe["lr"] = preset.adamw_lr
        if recipe.get("scale") == "128*hidden/512":
            recipe["scale"] = 128.0 * preset.hidden / 512
        if m in lr_over:
            recipe["lr"] = lr_over[m]
        if m == "adamw" and args.adamw_other_lr is not None:
            recipe["other_lr"] = args.adamw_other_lr
        if m in scale_over:
            if "scale" not in recipe:
                raise SystemExit(f"--scale: {m} has no scale")
            recipe["scale"] = scale_over[m]
        try:
            r = train_one(m, preset, batches, device, args.seed, recipe, progress=not args.no_progress)
            results.append(r)
            print(f"{m}: val loss {r.final_val_loss:.4f}, state {r.state_bytes:,} B, peak {r.peak_bytes:,} B, "
                  f"{r.tokens_per_s:.0f} tokens/s, {r.seconds:.0f} s ({r.status})", flush=True)
        except Exception as e:  # noqa: BLE001 - reported, and the exit status says so
            import traceback

            traceback.print_exc()
            results.append(Result(m, f"failed: {type(e).__name__}: {e}"))

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(results, out / "convergence.csv")
    title = (f"{dev} | LLaMA h{preset.hidden} L{preset.layers} seq{preset.seq_len}, "
             f"{preset.steps} steps x {preset.batch_size * preset.seq_len} tokens, rank {preset.rank}")
    write_plot(results, out / "convergence.png", title)
    meta = {
        "device": dev, "torch": torch.__version__, "git_sha": _git_sha(), "data": desc,
        "preset": dataclasses.asdict(preset), "seed": args.seed,
        "peak_memory": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                        else "growth of VmHWM over VmRSS (reset via /proc/self/clear_refs)"),
        "methods": {r.method: {"status": r.status, "recipe": r.recipe,
                               "final_val_loss": r.final_val_loss, "curve": r.curve,
                               "seconds": r.seconds} for r in results},
    }
    (out / "convergence.json").write_text(json.dumps(meta, indent=1))
    print()
    print(format_table(results))
    for line in acceptance(results):
        print(line)
    print(f"wrote {out / 'convergence.csv'}, {out / 'convergence.png'}, {out / 'convergence.json'}")
    return results, out


def main(argv=None) -> int:
    results, _ = run(argv)
    return 1 if any(r.status.startswith("failed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
