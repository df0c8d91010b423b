"""Integrations with training frameworks.

- :mod:`lowrank_kernels.integrations.transformers`: the Hugging Face ``Trainer``
  (``Trainer(optimizer_cls_and_kwargs=lowrank_optimizer(...))``).
- :mod:`lowrank_kernels.integrations.owlore`: OwLore's layer sampler as a ``Trainer``
  callback (:func:`~lowrank_kernels.integrations.owlore.owlore_callback`).

Each integration imports its framework only when it is used, so importing this
package needs nothing beyond torch.
"""
