"""Low-rank gradient optimizers on the fused ``lowrank_kernels.ops`` kernels.

All are ``torch.optim.Optimizer`` subclasses sharing :class:`LowRankOptimizer`
(``base.py``: the step loop, param selection, validation, refresh schedule, stored
projection side, non-finite handling, state-dict handling) and its collaborators:
``config.py`` (the shared hyper-parameters), ``moments.py`` (moment formats),
``plain.py`` (plain AdamW), ``capturable.py`` (CUDA-graph steps). Param groups use
galore-torch's keys (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``); a
group without ``rank`` is plain AdamW, bit-identical to ``torch.optim.AdamW``.

- :class:`GaLoreAdamW`: SVD projector, fused project-Adam-back-project step.
- :class:`GaLoreAdafactor`: GaLore's projector with Adafactor (factored second moment) on ``R``.
- :class:`APOLLOAdamW` (and :meth:`APOLLOAdamW.mini`): seeded random projection,
  channel- or tensor-wise scaling of the raw gradient.
- :class:`FrugalAdamW`: AdamW in a subspace + signSGD/SGD on the residual.
- :class:`DCTAdamW`: SVD-free projector, DCT basis vectors picked by gradient alignment.
- :class:`FiraAdamW`: GaLore plus the gradient outside the subspace, scaled by the
  low-rank Adam update's norm ratio, with a norm-growth limiter (SVD or DCT projector).
- :class:`GradNormLoRPAdamW`: GaLore on the direction of a per-row weight-normalized
  weight, Adam on its magnitude (our interpretation of GradNormLoRP).
- :class:`Trion`: low-rank Muon on the DCT basis (momentum, DCT top-k, Newton-Schulz).
- :func:`lowrank_param_groups`: split a model into a low-rank and a plain group.
- :func:`layerwise`: step each parameter inside backward.
- :mod:`~lowrank_kernels.optim.registry`: every optimizer by name (class, defaults,
  capabilities, state-bytes formula); :func:`state_nbytes` counts an optimizer's state.
"""
from .adafactor import GaLoreAdafactor  # noqa: F401
from .apollo import APOLLOAdamW  # noqa: F401
from .base import LowRankOptimizer, resolve_side  # noqa: F401
from .dct import DCTAdamW  # noqa: F401
from .fira import FiraAdamW  # noqa: F401
from .frugal import FrugalAdamW  # noqa: F401
from .galore import GaLoreAdamW  # noqa: F401
from .gradnormlorp import GradNormLoRPAdamW  # noqa: F401
from .groups import lowrank_param_groups  # noqa: F401
from .layerwise import LayerwiseOptimizer, layerwise  # noqa: F401
from .qgalore import QGaLoreAdamW  # noqa: F401
from .trion import Trion  # noqa: F401
from . import registry  # noqa: F401
from .registry import state_nbytes  # noqa: F401

__all__ = [
    "LowRankOptimizer",
    "GaLoreAdamW",
    "GaLoreAdafactor",
    "APOLLOAdamW",
    "FrugalAdamW",
    "QGaLoreAdamW",
    "DCTAdamW",
    "FiraAdamW",
    "GradNormLoRPAdamW",
    "Trion",
    "lowrank_param_groups",
    "layerwise",
    "LayerwiseOptimizer",
    "resolve_side",
    "registry",
    "state_nbytes",
]
