"""OwLore (Li, Yin, Gao, Liu 2024, arXiv 2405.18380): outlier-weighted layer sampling.

OwLore is a *layer sampler in front of an optimizer* (the paper uses GaLore), not a
new optimizer. Every ``period`` steps it freezes all decoder layers and unfreezes
``gamma`` of them, drawn without replacement with probabilities proportional to each
layer's *outlier ratio* (OWL, Yin et al. 2024). Embeddings, the LM head and the final
norm are not decoder layers, so they always train.

- :func:`layer_outlier_ratios` measures the outlier ratio ``D_l`` of every decoder
  layer from calibration batches (one forward pass with hooks).
- :func:`sampling_probs` turns ratios into sampling probabilities (``owl`` and the
  official baselines ``owl_reverse``, ``uniform``, ``increase``, ``decrease``).
- :class:`LayerSampler` freezes / unfreezes layers (``on_step`` before each
  optimizer step's forward) and handles the optimizer state of frozen layers
  (``state="keep"``, the official behaviour, ``"offload"`` to the CPU, or ``"drop"``).
- :func:`owlore_callback` (:mod:`lowrank_kernels.integrations.owlore`, re-exported
  here) drives a sampler from a transformers ``Trainer``.

What is the official method and what is ours: the ratio formula, the sampling modes,
the ``RandomState.choice`` draw and the schedule follow the official code
(``pixeli99/OwLore``, ``luuyin/OWL``); the ``offload`` / ``drop`` state policies,
the memory bound under ``drop``, keeping parameters that were frozen before the
sampler was built frozen, and the checks are ours. Random-init models have no
heavy-tailed layers: the tests check mechanics, not the paper's accuracy.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer

MODES = ("owl", "owl_reverse", "uniform", "increase", "decrease")
STATES = ("keep", "offload", "drop")

__all__ = [
    "MODES",
    "STATES",
    "layer_outlier_ratios",
    "sampling_probs",
    "LayerSampler",
    "owlore_callback",
]


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# ---------------------------------------------------------------------------- outlier ratios

def _default_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
        raise ValueError(
            f"layers: {type(model).__name__} has no model.model.layers (the transformers LLaMA layout); "
            "pass the decoder layers explicitly, e.g. layers=model.transformer.h"
        )
    return layers


def _check_layers(layers, where: str) -> List[nn.Module]:
    if isinstance(layers, nn.Module) and not isinstance(layers, (nn.ModuleList, nn.Sequential)):
        raise TypeError(f"{where}: layers must be a sequence of nn.Module (e.g. an nn.ModuleList), "
                        f"got a single {type(layers).__name__}")
    try:
        out = list(layers)
    except TypeError:
        raise TypeError(f"{where}: layers must be a sequence of nn.Module, got {type(layers).__name__}") from None
    if not out:
        raise ValueError(f"{where}: layers is empty")
    for i, layer in enumerate(out):
        if not isinstance(layer, nn.Module):
            raise TypeError(f"{where}: layers[{i}] must be an nn.Module, got {type(layer).__name__}")
    return out


def _dense_weight(module: nn.Linear) -> torch.Tensor:
    """The Linear's weight as float64 (an INT8 ``QLinear`` is dequantized)."""
    deq = getattr(module, "dequantized_weight", None)
    if callable(deq):
        return deq(torch.float64)
    return module.weight.detach().to(torch.float64)


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


@torch.no_grad()
def layer_outlier_ratios(model: nn.Module, layers=None, batches: Optional[Iterable] = None,
                         M: float = 13.0) -> torch.Tensor:
    """OWL's layer outlier ratio ``D_l`` (in percent) of every decoder layer, float64.

    For every ``nn.Linear`` inside decoder layer ``l`` (subclasses included; an INT8
    ``QLinear`` is dequantized), with ``x`` its input over all tokens of all batches::

        s[j] = mean over tokens of x_j^2              (float64, forward hooks)
        A    = |W| * sqrt(s)[None, :]                 (the Wanda score)
        D_l  = 100 * #{A_l > M * mean(A_l)} / numel(A_l)

    where ``A_l`` is every score of the layer's Linears together. OWL divides ``s``
    by the number of sequences instead of tokens; ``D_l`` does not depend on that
    constant factor. One forward pass with hooks equals OWL's layer-by-layer pass
    because no weight changes while measuring.

    Args:
        model: called on each batch (in eval mode, without gradients; its training
            mode is restored afterwards).
        layers: the decoder layers (a sequence of modules); default
            ``model.model.layers`` (transformers LLaMA, Mistral, Qwen2, ...).
        batches: an iterable of model inputs: a Tensor (``model(batch)``), a dict
            (``model(**batch)``) or a tuple/list (``model(*batch)``). OWL uses 128
            C4 samples of 2048 tokens.
        M: the outlier threshold, in multiples of the layer's mean score (OWL's
            default is 3, its LLaMA-7B setting 5; OwLore's shipped ratio file is
            named ``..._13``, hence the default 13).

    Returns:
        ``torch.float64`` tensor of length ``len(layers)`` (CPU).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"layer_outlier_ratios: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(M, bool) or not isinstance(M, (int, float)) or not math.isfinite(M) or M <= 0:
        raise ValueError(f"layer_outlier_ratios: M must be a finite number > 0, got {M!r}")
    if batches is None:
        raise ValueError("layer_outlier_ratios: batches is required (an iterable of calibration inputs)")
    layers = _check_layers(_default_layers(model) if layers is None else layers, "layer_outlier_ratios")
    linears: List[List[nn.Linear]] = []
    for i, layer in enumerate(layers):
        found = [m for m in layer.modules() if isinstance(m, nn.Linear)]
        if not found:
            raise ValueError(f"layer_outlier_ratios: layers[{i}] ({type(layer).__name__}) contains no nn.Linear")
        linears.append(found)

    sums: Dict[int, torch.Tensor] = {}
    counts: Dict[int, int] = {}

    def hook(module, inputs, output):
        x = inputs[0].detach().reshape(-1, module.in_features).to(torch.float64)
        key = id(module)
        sq = x.square().sum(0)
        sums[key] = sq if key not in sums else sums[key] + sq
        counts[key] = counts.get(key, 0) + x.shape[0]

    handles = [m.register_forward_hook(hook) for group in linears for m in group]
    was_training = model.training
    n_batches = 0
    try:
        model.eval()
        for batch in batches:
            _run(model, batch)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("layer_outlier_ratios: batches is empty")

    ratios = torch.empty(len(layers), dtype=torch.float64)
    for i, group in enumerate(linears):
        scores = []
        for m in group:
            if counts.get(id(m), 0) == 0:
                raise ValueError(
                    f"layer_outlier_ratios: a {type(m).__name__} in layers[{i}] was never called by the model's "
                    "forward (no input activations to score)"
                )
            s = sums[id(m)] / counts[id(m)]
            w = _dense_weight(m)
            scores.append(w.abs() * s.to(w.device).sqrt()[None, :])
        total = sum(int(a.numel()) for a in scores)
        mean = sum(a.sum() for a in scores) / total
        above = sum(int((a > M * mean).sum()) for a in scores)
        ratios[i] = 100.0 * above / total
    return ratios


# ---------------------------------------------------------------------------- probabilities

def sampling_probs(ratios, mode: str = "owl") -> torch.Tensor:
    """Layer sampling probabilities (float64, sums to 1), as OwLore's ``lisa_prob_mode``.

    - ``owl``: ``p_l = D_l / sum_k D_k``;
    - ``owl_reverse``: ``q_l = max(p) - p_l`` renormalized (``p`` from ``owl``; the
      most outlier-heavy layer gets probability 0);
    - ``uniform``: ``1 / L`` (LISA);
    - ``increase``: proportional to ``l + 1``; ``decrease``: to ``L - l``.

    ``ratios``: the ``L`` layer outlier ratios (a tensor, array or list; finite,
    >= 0); ``uniform``, ``increase`` and ``decrease`` use only its length.
    """
    if mode not in MODES:
        raise ValueError(f"sampling_probs: mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    d = _as_float64_vector(ratios, "sampling_probs: ratios")
    if (d < 0).any():
        raise ValueError(f"sampling_probs: ratios must be >= 0, got {d.tolist()}")
    L = d.numel()
    if mode == "uniform":
        return torch.full((L,), 1.0 / L, dtype=torch.float64)
    if mode == "increase":
        w = torch.arange(1, L + 1, dtype=torch.float64)
        return w / w.sum()
    if mode == "decrease":
        w = torch.arange(L, 0, -1, dtype=torch.float64)
        return w / w.sum()
    if d.sum() <= 0:
        raise ValueError(f"sampling_probs: mode {mode!r} needs a positive ratio, but every ratio is 0 "
                         "(no outliers at this M; lower M or use mode='uniform')")
    p = d / d.sum()
    if mode == "owl":
        return p
    q = p.max() - p
    if q.sum() <= 0:
        raise ValueError("sampling_probs: mode 'owl_reverse' is undefined when every ratio is equal "
                         "(max(p) - p is all zero); use mode='uniform'")
    return q / q.sum()


def _as_float64_vector(x, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError):
            raise TypeError(f"{what} must be a 1-D sequence of numbers, got {type(x).__name__}") from None
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{what} must be a non-empty 1-D sequence, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} must be finite, got {t.tolist()}")
    return t


# ---------------------------------------------------------------------------- the sampler

def _resolve_optimizers(optimizer) -> List[Optimizer]:
    """The torch optimizers that hold the per-parameter state behind ``optimizer``."""
    from lowrank_kernels.optim.layerwise import LayerwiseOptimizer

    obj = optimizer
    # Wrappers (accelerate's AcceleratedOptimizer, used by transformers' Trainer) keep the
    # real optimizer in .optimizer.
    for _ in range(8):
        inner = getattr(obj, "optimizer", None)
        if isinstance(inner, (Optimizer, LayerwiseOptimizer)):
            obj = inner
        else:
            break
    if isinstance(obj, LayerwiseOptimizer):
        return list(obj.optimizers)
    if isinstance(obj, Optimizer):
        return [obj]
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(o, Optimizer) for o in obj):
        return list(obj)
    raise TypeError(
        "LayerSampler: optimizer must be a torch.optim.Optimizer, a LayerwiseOptimizer (layerwise()), "
        f"a list of Optimizers or a wrapper with .optimizer, got {type(optimizer).__name__}"
    )


class LayerSampler:
    """Train ``gamma`` of ``L`` decoder layers at a time, re-drawn every ``period`` steps.

    Call :meth:`on_step` with the 0-based optimizer step *before* that step's forward
    pass (the transformers adapter :func:`owlore_callback` does it in
    ``on_step_begin``). At steps with ``step % period == 0`` (and at the first call,
    whatever the step) it draws ``idx = rng.choice(L, gamma, replace=False, p=probs)``
    from one ``numpy.random.RandomState(seed)`` (successive draws from the same
    generator; the official code draws from numpy's global generator), then:

    - every parameter of a layer not in ``idx`` gets ``requires_grad_(False)`` and its
      ``.grad`` is dropped (so no optimizer steps it, weight decay included: its
      weights stay bit-identical); every parameter of the drawn layers that was
      trainable when the sampler was built gets ``requires_grad_(True)``. Parameters
      already frozen at construction (e.g. a LoRA base) stay frozen (the official
      code would unfreeze them). Parameters outside ``layers`` are never touched.
    - the optimizer state of frozen layers' parameters follows ``state``:

      ``"keep"`` (official): left as is; memory creeps towards the optimizer's state
      for all layers. A re-activated layer resumes with its old moments and its own
      step count: bias correction and the projector refresh schedule
      (``(t - 1) % update_proj_gap == 0`` on the parameter's own count ``t``) continue
      where they stopped, so a layer active 1/5 of the time refreshes every
      ~5 ``update_proj_gap`` global steps.
      ``"offload"``: every state tensor not on the CPU moves to the CPU, and back to
      its device on re-activation (same numbers as ``keep``; accelerator memory as
      ``drop``).
      ``"drop"``: the state entries are deleted; a re-activated layer starts fresh
      (step 1, zero moments, a new projector at its first step, AdamW bias
      correction restarted). Optimizer memory is bounded by ``gamma`` layers plus the
      always-trained parameters.

    ``offload`` and ``drop`` need ``optimizer`` (a torch ``Optimizer`` of any kind,
    e.g. ``GaLoreAdamW``, ``DCTAdamW``, ``QGaLoreAdamW``, ``APOLLOAdamW``,
    ``FrugalAdamW`` or ``torch.optim.AdamW``; a :func:`~lowrank_kernels.optim.layerwise`
    optimizer, whose per-parameter optimizers are searched; a list of optimizers; or
    a wrapper exposing ``.optimizer``). When given, it must hold every trainable
    parameter of ``layers``: build it over all parameters *before* the first
    :meth:`on_step` (``lowrank_param_groups`` and ``layerwise`` skip parameters that
    do not require grad). It can also be attached later (``sampler.optimizer = opt``).

    Args:
        layers: the decoder layers (e.g. ``model.model.layers``).
        probs: ``L`` sampling probabilities (>= 0, summing to 1 within 1e-6; used
            as given when they sum to 1 within 1e-12, else renormalized), e.g. from
            :func:`sampling_probs`; ``None`` draws uniformly with
            ``rng.choice(L, gamma, replace=False)``, without ``p`` as LMFlow's LISA
            does (a ``p`` array of ``1/L`` values draws a different sequence).
        gamma: layers trained at a time (OwLore: 5; LISA: 2).
        period: steps between draws (OwLore: 50; LISA: 3).
        seed: of the ``RandomState`` (OwLore: 111). Under DDP every rank must use
            the same seed (and probs) so that all ranks train the same layers.
        state: ``"keep"``, ``"offload"`` or ``"drop"`` (above).
        optimizer: see above.

    DDP: freezing parameters of a ``DistributedDataParallel`` model between steps
    needs ``find_unused_parameters=True`` (the frozen parameters produce no
    gradient; DDP then leaves their ``.grad`` as None); ``static_graph=True`` is
    wrong here, since the set of parameters with gradients changes every period.
    """

    def __init__(self, layers, probs=None, gamma: int = 5, period: int = 50, seed: int = 111,
                 state: str = "keep", optimizer=None):
        layers = _check_layers(layers, "LayerSampler")
        L = len(layers)
        if probs is None:
            p = None
            support = L
        else:
            p = _as_float64_vector(probs, "LayerSampler: probs").numpy().copy()
            if p.size != L:
                raise ValueError(f"LayerSampler: probs has length {p.size}, but there are {L} layers")
            if (p < 0).any():
                raise ValueError(f"LayerSampler: probs must be >= 0, got {p.tolist()}")
            total = float(p.sum())
            if abs(total - 1.0) > 1e-6:
                raise ValueError(f"LayerSampler: probs must sum to 1, they sum to {total!r}")
            if abs(total - 1.0) > 1e-12:
                p = p / total
            support = int((p > 0).sum())
        if not _is_int(gamma) or gamma < 1:
            raise ValueError(f"LayerSampler: gamma must be an int >= 1, got {gamma!r}")
        if gamma > L:
            raise ValueError(f"LayerSampler: gamma={gamma} is larger than the number of layers ({L})")
        if gamma > support:
            raise ValueError(f"LayerSampler: gamma={gamma} but only {support} layers have a probability > 0 "
                             "(a draw without replacement needs gamma of them)")
        if not _is_int(period) or period < 1:
            raise ValueError(f"LayerSampler: period must be an int >= 1, got {period!r}")
        if not _is_int(seed) or not 0 <= seed < 2**32:
            raise ValueError(f"LayerSampler: seed must be an int in [0, 2**32), got {seed!r}")
        if state not in STATES:
            raise ValueError(f"LayerSampler: state must be one of {', '.join(map(repr, STATES))}, got {state!r}")
        self.layers = layers
        self.probs = p
        self.gamma = int(gamma)
        self.period = int(period)
        self.seed = int(seed)
        self.state = state
        # The parameters the sampler controls: those trainable now, per layer, each once.
        seen = set()
        self._params: List[List[torch.Tensor]] = []
        for layer in layers:
            own = []
            for q in layer.parameters():
                if q.requires_grad and id(q) not in seen:
                    seen.add(id(q))
                    own.append(q)
            self._params.append(own)
        self._rng = np.random.RandomState(self.seed)
        self._active: Optional[List[int]] = None
        self._drawn_at: Optional[int] = None
        #: per offloaded parameter (by id): {state key: the device it came from}.
        self._offloaded: Dict[int, Dict[str, torch.device]] = {}
        self.optimizer = optimizer
        if optimizer is not None:
            self._owners()  # validate now: type and coverage

    # ------------------------------------------------------------------ public API
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def active(self) -> Optional[List[int]]:
        """The indices of the layers now trained, sorted (None before the first draw)."""
        return None if self._active is None else list(self._active)

    def on_step(self, step: int) -> bool:
        """Call before the forward of optimizer step ``step`` (0-based).

        Draws new layers when ``step % period == 0`` (once per step value: a repeated
        call with the same step does nothing) or when nothing was drawn yet. Returns
        whether it drew.
        """
        if not _is_int(step) or step < 0:
            raise ValueError(f"LayerSampler.on_step: step must be an int >= 0, got {step!r}")
        step = int(step)
        due = self._active is None or (step % self.period == 0 and step != self._drawn_at)
        if not due:
            return False
        owners = self._owners() if self.state != "keep" else None  # fails before anything changes
        if self.probs is None:
            idx = self._rng.choice(self.num_layers, self.gamma, replace=False)
        else:
            idx = self._rng.choice(self.num_layers, self.gamma, replace=False, p=self.probs)
        self._active = sorted(int(i) for i in idx)
        self._drawn_at = step
        self._apply(owners)
        return True

    def state_dict(self) -> Dict[str, Any]:
        """The sampler's position: the RandomState, the active layers and the step of the
        last draw, plus the settings checked at load. Plain ints, floats, strings, lists
        and tensors only, so it loads with ``torch.load(weights_only=True)``."""
        name, keys, pos, has_gauss, cached = self._rng.get_state()
        return {
            "rng": {
                "name": str(name),
                "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            },
            "active": None if self._active is None else list(self._active),
            "drawn_at": self._drawn_at,
            "num_layers": self.num_layers,
            "gamma": self.gamma,
            "period": self.period,
            "seed": self.seed,
            "probs": None if self.probs is None else torch.from_numpy(self.probs.copy()),
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: the RandomState continues where it was, the saved
        active layers are trained and the others frozen, and the ``state`` policy is
        applied to the frozen layers' optimizer state (load the optimizer's own state
        first, then this). The layers, gamma, period, seed and probs must be the ones
        saved (ValueError otherwise; nothing changes)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"LayerSampler.load_state_dict: expected a dict, got {type(state_dict).__name__}")
        for key, mine in (("num_layers", self.num_layers), ("gamma", self.gamma), ("period", self.period),
                          ("seed", self.seed)):
            if state_dict.get(key) != mine:
                raise ValueError(f"LayerSampler.load_state_dict: saved {key}={state_dict.get(key)!r}, "
                                 f"this sampler has {key}={mine!r}")
        saved_p = state_dict.get("probs")
        if (saved_p is None) != (self.probs is None) or (
            saved_p is not None and not np.array_equal(np.asarray(saved_p, dtype=np.float64), self.probs)
        ):
            raise ValueError("LayerSampler.load_state_dict: the saved probs differ from this sampler's")
        active = state_dict.get("active")
        if active is not None and (len(active) != self.gamma or sorted(set(active)) != sorted(active)
                                   or not all(_is_int(i) and 0 <= i < self.num_layers for i in active)):
            raise ValueError(f"LayerSampler.load_state_dict: bad active layers {active!r}")
        rng = state_dict.get("rng")
        if not isinstance(rng, dict) or not {"name", "keys", "pos", "has_gauss", "cached_gaussian"} <= set(rng):
            raise ValueError("LayerSampler.load_state_dict: missing or malformed 'rng' entry")
        keys = np.asarray(rng["keys"].numpy() if isinstance(rng["keys"], torch.Tensor) else rng["keys"],
                          dtype=np.uint32)
        new_rng = np.random.RandomState()
        try:
            new_rng.set_state((rng["name"], keys, int(rng["pos"]), int(rng["has_gauss"]),
                               float(rng["cached_gaussian"])))
        except (TypeError, ValueError, IndexError) as e:
            raise ValueError(f"LayerSampler.load_state_dict: bad 'rng' entry ({e})") from None
        owners = self._owners() if (self.state != "keep" and active is not None) else None
        self._rng = new_rng
        self._drawn_at = state_dict.get("drawn_at")
        self._active = None if active is None else sorted(int(i) for i in active)
        if self._active is not None:
            self._apply(owners)

    # ------------------------------------------------------------------ internals
    def _owners(self) -> Dict[int, Optimizer]:
        """id(param) -> the optimizer whose ``state`` holds it; checks every controlled
        parameter is there."""
        if self.optimizer is None:
            raise ValueError(f"LayerSampler: state={self.state!r} needs the optimizer: pass optimizer=... "
                             "or set sampler.optimizer before the first on_step")
        owners: Dict[int, Optimizer] = {}
        for opt in _resolve_optimizers(self.optimizer):
            for group in opt.param_groups:
                for q in group["params"]:
                    owners.setdefault(id(q), opt)
        for li, params in enumerate(self._params):
            for q in params:
                if id(q) not in owners:
                    name = next((n for n, t in self.layers[li].named_parameters() if t is q), "?")
                    raise ValueError(
                        f"LayerSampler: parameter {name!r} of layer {li} is not in the optimizer (was it frozen "
                        "when the optimizer was built? build it over all parameters before the first on_step)"
                    )
        return owners

    def _apply(self, owners: Optional[Dict[int, Optimizer]]) -> None:
        active = set(self._active)
        for li, params in enumerate(self._params):
            on = li in active
            for q in params:
                q.requires_grad_(on)
                if not on:
                    q.grad = None
        if owners is None:
            return
        for li, params in enumerate(self._params):
            on = li in active
            for q in params:
                opt = owners[id(q)]
                if self.state == "drop":
                    if not on:
                        opt.state.pop(q, None)
                elif on:
                    self._restore(opt, q)
                else:
                    self._offload(opt, q)

    def _offload(self, opt: Optimizer, q: torch.Tensor) -> None:
        st = opt.state.get(q)
        if not st:
            return
        moved = self._offloaded.setdefault(id(q), {})
        for key, value in list(st.items()):
            if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                moved[key] = value.device
                st[key] = value.to("cpu")

    def _restore(self, opt: Optimizer, q: torch.Tensor) -> None:
        moved = self._offloaded.pop(id(q), None)
        st = opt.state.get(q)
        if not moved or not st:
            return
        for key, device in moved.items():
            value = st.get(key)
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                st[key] = value.to(device)


# ---------------------------------------------------------------------------- transformers adapter
def __getattr__(name: str):
    """``owlore_callback`` lives with the other Trainer integrations
    (:mod:`lowrank_kernels.integrations.owlore`); it is found here too, imported on first use
    so that this module imports nothing from the layer above it."""
    if name == "owlore_callback":
        from lowrank_kernels.integrations.owlore import owlore_callback

        return owlore_callback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
