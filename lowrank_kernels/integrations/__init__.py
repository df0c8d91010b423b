"""Integrations with training frameworks.

- :mod:`lowrank_kernels.integrations.transformers`: the Hugging Face ``Trainer``
  (``Trainer(optimizer_cls_and_kwargs=lowrank_optimizer(...))``).

Each integration imports its framework only when it is used, so importing this
package needs nothing beyond torch.
"""
