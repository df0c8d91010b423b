"""Shared helpers of the optimizer tests: gradient sequences, runners, an independent GaLore."""
import io
import math
import warnings

import torch


def grad_sequence(shape, steps, dtype=torch.float32, growing=False, seed=1):
    """Fixed random gradients (independent of the weights), optionally growing in norm."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen) * ((1.0 + 0.5 * t) if growing else 1.0)).to(dtype) for t in range(steps)]


def run(make_opt, w0, grads, dtype=None):
    """Step ``make_opt([param])`` through ``grads`` from ``w0``; return (param, optimizer)."""
    dtype = dtype or w0.dtype
    p = torch.nn.Parameter(w0.detach().clone().to(dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_opt(p)
    for g in grads:
        p.grad = g.to(dtype).clone()
        opt.step()
    return p, opt


def rel_change_err(out, ref, w0):
    """||out - ref|| / ||ref - w0||: error relative to how far the weights moved."""
    out, ref, w0 = out.detach().double(), ref.detach().double(), w0.detach().double()
    return ((out - ref).norm() / (ref - w0).norm()).item()


def roundtrip(state_dict):
    """torch.save + torch.load(weights_only=True) through memory."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def galore_float64(w0, grads, *, rank, gap, scale, lr, betas, eps, wd, side):
    """GaLore-AdamW written independently in float64 (torch's weight-decay order, stored side)."""
    w = w0.double().clone()
    b1, b2 = betas
    m = v = p = None
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if (t - 1) % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)  # float64 parameters: SVD in float64
            p = (vh[:rank] if side == "right" else u[:, :rank]).double()
        r = g @ p.T if side == "right" else p.T @ g
        if m is None:
            m = torch.zeros_like(r)
            v = torch.zeros_like(r)
        m = b1 * m + (1 - b1) * r
        v = b2 * v + (1 - b2) * r * r
        n = m / (v.sqrt() + eps)
        back = n @ p if side == "right" else p @ n
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        w = w * (1 - lr * wd) - step * scale * back
    return w
