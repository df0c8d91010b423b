"""OwLore's layer sampler in a Hugging Face ``transformers.Trainer``.

:func:`owlore_callback` wraps a :class:`lowrank_kernels.owlore.LayerSampler` in a
``TrainerCallback`` that calls ``sampler.on_step`` once per optimizer step::

    from lowrank_kernels.owlore import LayerSampler
    from lowrank_kernels.integrations.owlore import owlore_callback

    trainer.add_callback(owlore_callback(LayerSampler(model.model.layers, probs, gamma=2, state="drop")))

transformers is imported only when :func:`owlore_callback` is called.
(``lowrank_kernels.owlore.owlore_callback`` is the same function.)
"""
from __future__ import annotations


def owlore_callback(sampler: "LayerSampler"):  # noqa: F821 - lowrank_kernels.owlore.LayerSampler
    """A transformers ``TrainerCallback`` that calls ``sampler.on_step(state.global_step)``
    in ``on_step_begin`` (once per optimizer step, before its first forward).

    When ``sampler.optimizer`` is None, the Trainer's optimizer (passed to callbacks)
    is attached at the first call, so ``state="offload"``/``"drop"`` work with the
    optimizer the Trainer builds. Give the Trainer an optimizer over *all*
    parameters (e.g. ``optimizers=(opt, None)`` or ``optimizer_cls_and_kwargs``): a
    Trainer-built optimizer skips parameters that do not require grad at the time
    it is built. The sampler's own state is not saved in Trainer checkpoints: save
    ``sampler.state_dict()`` yourself to resume the same sequence.

    Requires transformers (imported here, not at module import).
    """
    from transformers import TrainerCallback

    from lowrank_kernels.owlore import LayerSampler  # here: lowrank_kernels.owlore re-exports this module

    if not isinstance(sampler, LayerSampler):
        raise TypeError(f"owlore_callback: sampler must be a LayerSampler, got {type(sampler).__name__}")

    class OwLoreCallback(TrainerCallback):
        """Drives a :class:`~lowrank_kernels.owlore.LayerSampler` from ``on_step_begin``."""

        def __init__(self, sampler):
            self.sampler = sampler

        def on_step_begin(self, args, state, control, **kwargs):
            if self.sampler.optimizer is None and kwargs.get("optimizer") is not None:
                self.sampler.optimizer = kwargs["optimizer"]
            self.sampler.on_step(int(state.global_step))
            return control

    return OwLoreCallback(sampler)


__all__ = ["owlore_callback"]
