"""What the distributed Trainer test runs in each of its 2 gloo processes (CPU).

accelerate (1.15) turns a CPU multi-process run into ``DistributedType.MULTI_CPU`` (DDP)
and never into FSDP: its ``AcceleratorState`` switches to FSDP only for accelerator device
types (``MULTI_GPU``, ``MULTI_XPU``, ...). So the Trainer with ``fsdp_config={"fsdp_version": 2}``
cannot run FSDP2 on a CPU; this records that, then trains with the Trainer's DDP and this
package's ``lowrank_optimizer`` factory, with the refreshes shared across the ranks
(``refresh_sharing="owner"``, the default) and replicated.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
import warnings

import torch

STEPS, GAP, RANK = 4, 2, 4


def _train(outdir, rank, **kw):
    import torch.distributed as dist
    import transformers as tf

    from lowrank_kernels.integrations.transformers import lowrank_optimizer

    from .test_transformers import RandomTokens, tiny_llama

    model = tiny_llama()
    args = tf.TrainingArguments(output_dir=outdir, max_steps=STEPS, per_device_train_batch_size=2, use_cpu=True,
                                report_to=[], save_strategy="no", seed=7, disable_tqdm=True, dataloader_num_workers=0,
                                logging_steps=1000)
    pair = lowrank_optimizer("galore_adamw", target_modules=["self_attn", "mlp"], optim_args=f"rank={RANK},update_proj_gap={GAP}",
                             lr=1e-2, weight_decay=0.1, **kw)
    trainer = tf.Trainer(model=model, args=args, train_dataset=RandomTokens(), optimizer_cls_and_kwargs=pair)
    svd, calls = torch.linalg.svd, []
    torch.linalg.svd = lambda *a, **k: calls.append(1) or svd(*a, **k)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
    finally:
        torch.linalg.svd = svd
    weights = [p.detach().clone() for p in model.parameters()]
    sums = torch.stack([w.double().sum() for w in weights])
    every = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(every, sums)
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    projected = sum(len(g["params"]) for g in opt.param_groups if g.get("rank") is not None)
    return weights, len(calls), all(torch.equal(e, sums) for e in every), projected, type(trainer.model_wrapped).__name__


def worker(rank, ws, port, outdir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(ws), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(ws),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results = {}
    try:
        import transformers as tf

        args = tf.TrainingArguments(output_dir=f"{outdir}/probe", use_cpu=True, report_to=[], fsdp=True,
                                    fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
        results["cpu_is_ddp_not_fsdp"] = [str(args.distributed_state.distributed_type) == "DistributedType.MULTI_CPU",
                                          str(args.distributed_state.distributed_type)]
        owner, n_owner, same_owner, projected, wrapper = _train(f"{outdir}/owner", rank)
        rep, n_rep, same_rep, _, _ = _train(f"{outdir}/rep", rank, refresh_sharing="replicate")
        results["ddp"] = [wrapper == "DistributedDataParallel", wrapper]
        results["ranks_agree"] = [same_owner and same_rep, [same_owner, same_rep]]
        results["owner_equals_replicate"] = [all(torch.equal(a, b) for a, b in zip(owner, rep)), len(owner)]
        results["svds"] = [True, {"owner": n_owner, "replicate": n_rep, "projected": projected}]
    except Exception:
        traceback.print_exc()
        results["error"] = [False, traceback.format_exc()]
    sys.stderr.flush()
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, default=str)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
