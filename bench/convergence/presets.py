"""Model size, data shape and schedule of a run (identical for every method of the run)."""
from __future__ import annotations

import dataclasses


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
    min_lr_ratio: float = 0.1
    autocast_bf16: bool = False


PRESETS = {
    # CPU default. hidden 128, 4 layers: the attention and MLP weights hold 92% of the
    # 0.86M parameters (as in LLaMA, where embeddings are a small share); rank 32 =
    # hidden/4, the GaLore paper's ratio (60M: hidden 512, rank 128). The run is ~40x
    # shorter than the paper's, so the projector refresh gap shrinks with it (200 of
    # 10k steps in the paper; here 40 of 240, i.e. 6 subspaces per run).
    "quick": Preset("quick", hidden=128, intermediate=344, layers=4, heads=4, seq_len=64,
                    batch_size=16, steps=240, warmup_frac=0.1, eval_every=20, eval_batches=8,
                    rank=32, gap=40),
    # GaLore paper's LLaMA-60M (hidden 512, MLP 1376, 8 heads, 8 layers, seq 256, rank
    # 128, gap 200), trained for 500 steps of 64 x 256 tokens in bf16 autocast: a short
    # slice of the paper's 10k-step run.
    "gpu": Preset("gpu", hidden=512, intermediate=1376, layers=8, heads=8, seq_len=256,
                  batch_size=64, steps=500, warmup_frac=0.1, eval_every=50, eval_batches=8,
                  rank=128, gap=200, autocast_bf16=True),
    # For the test suite: the quick model at half width and depth, rank hidden/4 and 6
    # subspaces per run as in quick. Long enough for the projected weights to matter: in
    # the first ~60 steps the frozen-weights control keeps up with every method (the
    # embeddings and head learn byte statistics fastest); at 150 steps it falls behind.
    "tiny": Preset("tiny", hidden=64, intermediate=172, layers=2, heads=2, seq_len=32,
                   batch_size=8, steps=150, warmup_frac=0.1, eval_every=25, eval_batches=4,
                   rank=16, gap=25),
}
