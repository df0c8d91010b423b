"""The code ``test_refresh_variants_dist.py`` runs in each of its 2 gloo processes (CPU):
``moment_transport=True`` and the ``refresh="sample" | "random"`` options under DDP and FSDP2
against one process (``_worker.check_parity``: same model, batch, steps and tolerance)."""
from __future__ import annotations

import traceback

from .._dist import rank_session
from . import _worker
from ._worker import GAP, LR, _groups


def configs():
    from lowrank_kernels.optim import DCTAdamW, GaLoreAdamW

    return {
        # std: right-side weights (moments sharded by rows) and left-side ones (projector sharded by rows)
        "galore_transport": lambda m: GaLoreAdamW(
            _groups(m, rank=2, update_proj_gap=GAP, moment_transport=True), lr=LR, weight_decay=0.1),
        "galore_transport_8bit": lambda m: GaLoreAdamW(
            _groups(m, rank=2, update_proj_gap=GAP, moment_transport=True, moment_bits=8, min_8bit_size=0,
                    block_size=4), lr=LR),
        "galore_sample": lambda m: GaLoreAdamW(_groups(m, rank=2, update_proj_gap=GAP, refresh="sample"), lr=LR),
        "galore_random": lambda m: GaLoreAdamW(
            _groups(m, rank=2, update_proj_gap=GAP, refresh="random", random_after=1), lr=LR),
        "dct_transport": lambda m: DCTAdamW(_groups(m, rank=2, update_proj_gap=GAP, moment_transport=True), lr=LR),
    }


def worker(rank, ws, port, outdir, names):
    with rank_session(rank, ws, port, outdir) as results:
        cfgs = configs()
        for name in names:
            try:
                _worker.check_parity(name, cfgs[name], rank, ws, results)
            except Exception:
                results[f"ddp_parity[{name}]"] = results[f"fsdp_parity[{name}]"] = [False, traceback.format_exc()]
