"""``python -m bench.convergence.finetune``: OwLore as a fine-tuning run, against full and GaLore fine-tuning.

OwLore (:mod:`lowrank_kernels.owlore`) is a layer sampler in front of GaLore, made for
fine-tuning a pre-trained model, so it is measured here as one:

1. Pre-train the demo model (the preset's LLaMA, seed ``--seed``) with the AdamW recipe
   of :mod:`.recipes` on the training split for the preset's steps (once; every
   fine-tuning run starts from these weights).
2. Fine-tune on data none of that touched: the corpus's *tuning* split (stdlib files
   whose path CRC32 is 1 mod 20; never trained on, never in the validation split), its
   first 90% for fine-tuning batches and its last 10% for the fine-tuning loss.
3. Three methods, same steps (half the preset's), same batches, same schedule (warmup
   then cosine, as the demo), each recipe's learning rates times ``FT_LR_FACTOR`` (0.1,
   a fine-tuning convention, not tuned here):

   - ``full``: torch AdamW on every parameter (the AdamW recipe);
   - ``galore``: GaLoreAdamW on the attention/MLP linears (the GaLore recipe);
   - ``owlore``: the same GaLoreAdamW behind :class:`~lowrank_kernels.owlore.LayerSampler`
     with probabilities from the pre-trained model's layer outlier ratios (OWL,
     ``mode="owl"``, measured on 4 fine-tuning batches), ``gamma`` = half the decoder
     layers, ``period`` = steps / 6 (the paper: 50 of thousands), ``state="drop"`` (the
     optimizer state of frozen layers is deleted, so it is bounded by ``gamma`` layers).

Reported per method: the fine-tuning loss (held-out 10% of the tuning split), the loss on
the validation split (what the pre-trained model already knew: forgetting), the
optimizer state in bytes at the end and its maximum over the steps, and the peak memory
(as the demo measures it). Output: ``<out>/convergence_finetune.json`` (stamped),
shown in the README by ``python -m bench.readme``.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import pathlib
import sys
import time

import torch

from lowrank_kernels.optim import state_nbytes

from .. import stamps
from .data import Batches, load_corpus
from .presets import PRESETS, Preset
from .recipes import RECIPES
from .training import PeakMemory, build_model, evaluate, lm_loss, lr_lambda

FT_METHODS = ("full", "galore", "owlore")
FT_LR_FACTOR = 0.1
FT_TRAIN_FRACTION = 0.9
OUT_NAME = "convergence_finetune.json"


def finetune_splits(tune: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fine-tuning stream (first 90% of the tuning split) and its held-out rest."""
    cut = int(len(tune) * FT_TRAIN_FRACTION)
    return tune[:cut], tune[cut:]


def _loop(model, optimizer, batches: Batches, preset: Preset, device, steps: int, before_step=None,
          after_step=None) -> list[tuple[int, float]]:
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(preset, steps))
    curve = [(0, evaluate(model, batches, device, preset))]
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        lm_loss(model, batches.train_batch(step).to(device)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if after_step is not None:
            after_step(step)
        if (step + 1) % preset.eval_every == 0 or step + 1 == steps:
            curve.append((step + 1, evaluate(model, batches, device, preset)))
            if not math.isfinite(curve[-1][1]):
                break
    return curve


def pretrain(preset: Preset, corpus, device, seed: int) -> tuple[dict, list]:
    """The AdamW-recipe pre-training of the demo: (state dict on the CPU, validation curve)."""
    model = build_model(preset, seed, device)
    hp = RECIPES["adamw"].resolve(preset)
    opt = RECIPES["adamw"].build(model, preset, hp)
    curve = _loop(model, opt, Batches(corpus.train, corpus.val, preset, seed), preset, device, preset.steps)
    sd = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    del model, opt
    gc.collect()
    return sd, curve


def ft_recipe(method: str, preset: Preset, steps: int) -> dict:
    """The fine-tuning hyper-parameters of ``method``: its recipe's lrs times FT_LR_FACTOR (+ sampler)."""
    if method not in FT_METHODS:
        raise ValueError(f"method must be one of {FT_METHODS}, got {method!r}")
    base = RECIPES["adamw" if method == "full" else "galore"].resolve(preset)
    hp = dict(base, lr=base["lr"] * FT_LR_FACTOR, other_lr=base["other_lr"] * FT_LR_FACTOR)
    if method == "owlore":
        hp.update(gamma=max(1, preset.layers // 2), period=max(1, steps // 6), state="drop", mode="owl")
    return hp


def finetune_one(method: str, preset: Preset, pretrained: dict, ft_batches: Batches, val_batches: Batches,
                 device, seed: int, steps: int) -> dict:
    """Fine-tune the pre-trained weights with ``method`` for ``steps`` steps; the run's record."""
    from lowrank_kernels.owlore import LayerSampler, layer_outlier_ratios, sampling_probs

    hp = ft_recipe(method, preset, steps)
    t0 = time.perf_counter()
    max_state = [0]
    with PeakMemory(device) as mem:
        model = build_model(preset, seed, device)
        model.load_state_dict(pretrained)
        opt = RECIPES["adamw" if method == "full" else "galore"].build(model, preset, hp)
        before = None
        ratios = probs = None
        if method == "owlore":
            calib = [ft_batches.train_batch(i)[:, :-1].to(device) for i in range(4)]
            ratios = layer_outlier_ratios(model, model.model.layers, [{"input_ids": b} for b in calib])
            probs = sampling_probs(ratios, hp["mode"])
            sampler = LayerSampler(model.model.layers, probs=probs, gamma=hp["gamma"], period=hp["period"],
                                   seed=111, state=hp["state"], optimizer=opt)
            before = sampler.on_step

        def after(step):
            max_state[0] = max(max_state[0], state_nbytes(opt))

        curve = _loop(model, opt, ft_batches, preset, device, steps, before, after)
        peak = mem.peak()
        end_state = state_nbytes(opt)
        val = evaluate(model, val_batches, device, preset)
    rec = {"method": method, "seed": seed, "recipe": hp, "steps": steps,
           "status": "ok" if all(math.isfinite(v) for _, v in curve) else "diverged",
           "ft_loss": curve[-1][1], "ft_loss_start": curve[0][1], "val_loss": val, "curve": curve,
           "state_bytes": end_state, "max_state_bytes": max_state[0], "peak_bytes": peak,
           "seconds": time.perf_counter() - t0}
    if ratios is not None:
        rec["outlier_ratios"] = [float(x) for x in ratios]
        rec["probs"] = [float(x) for x in probs]
    del model, opt
    gc.collect()
    return rec


def run(argv=None) -> tuple[dict, pathlib.Path]:
    """Parse ``argv``, pre-train once, fine-tune with every method, write the JSON."""
    ap = argparse.ArgumentParser(prog="python -m bench.convergence.finetune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: half the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(FT_METHODS))
    ap.add_argument("--data", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent.parent / "out"),
                    help="output folder (default: bench/out/, ignored by git; bench/results/ holds the committed results)")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in FT_METHODS]
    if bad or not methods:
        ap.error(f"--methods: unknown {bad or '(empty)'}; choose from {', '.join(FT_METHODS)}")
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    st = stamps.stamp(device)  # first: the code this process runs
    preset = PRESETS[args.preset]
    steps = args.steps or max(1, preset.steps // 2)
    ft_preset = dataclasses.replace(preset, steps=steps, eval_every=max(1, min(preset.eval_every, steps // 4 or 1)))
    corpus = load_corpus(args.data)
    ft_train, ft_eval = finetune_splits(corpus.tune)
    print(f"git {st['git']}; pre-training {preset.name} with AdamW for {preset.steps} steps", flush=True)
    pretrained, pre_curve = pretrain(preset, corpus, device, args.seed)
    print(f"pre-trained: validation loss {pre_curve[-1][1]:.4f}", flush=True)
    ft_batches = Batches(ft_train, ft_eval, ft_preset, args.seed + 1000)
    val_batches = Batches(corpus.train, corpus.val, ft_preset, args.seed)
    runs = []
    for m in methods:
        r = finetune_one(m, ft_preset, pretrained, ft_batches, val_batches, device, args.seed, steps)
        print(f"{m}: fine-tuning loss {r['ft_loss_start']:.4f} -> {r['ft_loss']:.4f}, validation {r['val_loss']:.4f}, "
              f"state {r['state_bytes']:,} B (max {r['max_state_bytes']:,}), peak {r['peak_bytes']:,} B", flush=True)
        runs.append(r)
    info = {"git": st["git"], "device": st["device_name"], "torch": st["torch"], "timestamp": st["timestamp"],
            "data": corpus.desc, "preset": dataclasses.asdict(preset), "finetune_steps": steps, "seed": args.seed,
            "pretrain": {"method": "adamw", "recipe": RECIPES["adamw"].resolve(preset), "steps": preset.steps,
                         "val_curve": pre_curve},
            "finetune_data": f"tuning split: first {FT_TRAIN_FRACTION:.0%} ({len(ft_train):,} bytes) trains, "
                             f"the rest ({len(ft_eval):,} bytes) is the fine-tuning loss",
            "lr_factor": FT_LR_FACTOR,
            "peak_memory": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                            else "growth of VmHWM over VmRSS (reset via /proc/self/clear_refs)"),
            "command": "python -m bench.convergence.finetune " + " ".join(sys.argv[1:] if argv is None else argv),
            "runs": runs}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / OUT_NAME).write_text(json.dumps(info, indent=1))
    print(f"wrote {out / OUT_NAME}")
    return info, out


def main(argv=None) -> int:
    info, _ = run(argv)
    return 0 if all(r["status"] == "ok" for r in info["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
