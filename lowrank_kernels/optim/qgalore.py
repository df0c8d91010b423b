"""Q-GaLore (Zhang et al. 2024): GaLore with a packed INT4 projector, INT8 weights
updated with stochastic rounding, and a layer-adaptive refresh gap."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple, Unpack

import torch
import torch.nn.functional as F

from lowrank_kernels import ops
from lowrank_kernels.nn.qlinear import qlinear_of

from . import moments
from . import refresh as _refresh
from .base import _PLAIN_TENSORS, LowRankOptimizer
from .common import adam_step_size, assign_, mix_seed
from .config import OptimizerConfig, SharedOptions, shared_signature
from .galore import GaLoreAdamW

SIMILARITIES = ("abs_cos", "overlap")
#: float32 elements (16 MiB) of the scratch an INT8 weight's back-projected update is staged
#: in, one panel of rows at a time (see :func:`int8_panels`).
INT8_PANEL_ELEMS = 1 << 22


def int8_panels(m: int, n: int, group_size: int, rank: int, max_elems: int = INT8_PANEL_ELEMS) -> List[Tuple[int, int]]:
    """Row ranges ``[r0, r1)`` covering an ``m x n`` INT8 weight, one update panel each.

    Every panel starts and (but for the last) ends on a quantization-group boundary
    (``r0 * n % group_size == 0``; groups are ``group_size`` consecutive row-major
    elements), so each panel's groups are whole and :func:`lowrank_kernels.ops.int8_update_sr_`
    can requantize it on its own; it has at least ``rank`` rows (the back-projection of a
    panel is a rank-``rank`` product) and at most ``max(max_elems // n, rank)`` rows
    rounded up to the group alignment, except that a last remainder of fewer than
    ``rank`` rows joins the panel before it. One panel (``[(0, m)]``) when the whole
    weight fits.
    """
    step = group_size // math.gcd(n, group_size)  # rows per group-aligned unit
    rows = max(max_elems // max(n, 1), rank, 1)
    rows = -(-rows // step) * step
    if rows >= m:
        return [(0, m)]
    out = []
    r0 = 0
    while r0 < m:
        r1 = min(r0 + rows, m)
        if 0 < m - r1 < rank:
            r1 = m
        out.append((r0, r1))
        r0 = r1
    return out


def projector_similarity(old: torch.Tensor, new: torch.Tensor, side: str, kind: str = "abs_cos") -> torch.Tensor:
    """Sign-safe similarity of two projectors (0-d float32 tensor on their device).

    ``abs_cos``: ``|cos|`` between the top singular vectors (row 0 of a right
    projector, column 0 of a left one); Q-GaLore's criterion without its sign
    ambiguity (a singular vector and its negative span the same line).
    ``overlap``: ``||P_old P_new^T||_F^2 / r`` (right; ``P_old^T P_new`` for left), the
    mean squared cosine of the principal angles between the two subspaces, in [0, 1].
    """
    old = old.to(torch.float32)
    new = new.to(torch.float32)
    if kind == "abs_cos":
        a = old[0] if side == "right" else old[:, 0]
        b = new[0] if side == "right" else new[:, 0]
        return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).abs()
    if kind == "overlap":
        r = new.shape[0] if side == "right" else new.shape[1]
        cross = old @ new.T if side == "right" else old.T @ new
        return cross.square().sum() / r
    raise ValueError(f"unknown similarity {kind!r}; expected one of {', '.join(SIMILARITIES)}")


class QGaLoreAdamW(GaLoreAdamW):
    r"""Q-GaLore-AdamW, a drop-in for ``q_galore_torch.QGaLoreAdamW8bit`` (its group keys).

    Per projected ``m x n`` weight (groups that set ``rank``), as :class:`GaLoreAdamW`
    with three changes:

    - **INT4 projector** (``quant=True``, default): after each SVD the projector is
      packed to 4 bits per value with :func:`lowrank_kernels.ops.int4_pack`
      (``quant_group_size`` values per float32 scale/minimum, default 256) and the
      step's GEMMs dequantize its tiles as they load them
      (:class:`lowrank_kernels.ops.Int4Projector`). The projector is quantized from the
      float32 SVD output. Unlike q-galore-torch, values are packed two per byte and
      the group minimum is kept exactly (no clamped integer zero point, so groups that
      are all positive or all negative are not clipped). ``quant=False`` keeps a dense
      projector in the parameter's dtype (then this is GaLore plus the adaptive gap).
    - **INT8 weights**: when the parameter is the weight of a
      :class:`lowrank_kernels.nn.QLinear` (its gradient placeholder), the update
      ``W <- (1 - lr wd) W - step_size * scale * back(N)`` is applied to the INT8
      storage by :func:`lowrank_kernels.ops.int8_update_sr_`: dequantize, update in
      float32, requantize with fresh group stats and stochastic rounding
      (``stochastic_round=True``, default; seed = hash of the optimizer ``seed``, the
      parameter's position and the step, so runs are reproducible), or round to
      nearest (``stochastic_round=False``). No full-size float32 update is made:
      the update is back-projected and applied one panel of rows at a time
      (:func:`int8_panels`: whole quantization groups, at most ``int8_panel_elems``
      float32 elements, default 2^22 = 16 MiB, in one reused scratch). When the weight
      fits in one panel the result is bit-identical to a whole-weight update; with
      several panels, panel ``k > 0`` draws its rounding from the seed
      ``mix_seed(seed_of_step, k)`` (the draws depend on the panel layout, not only on
      the seed). QLinear weights in plain (``rank=None``)
      groups get AdamW with full-size float32 moments, requantized the same way.
    - **Layer-adaptive refresh**: refreshes happen at steps ``t`` with
      ``(t - 1) % T_layer == 0`` (q-galore-torch's schedule), ``T_layer`` starting at
      ``update_proj_gap``. At every refresh but the first, the similarity of the new
      projector to the previous one (:func:`projector_similarity`, ``similarity=
      "abs_cos"`` by default: the sign-safe version of the reference's cosine of the
      top singular vectors; or ``"overlap"``) enters a queue of ``queue_size``
      (default 5) values; when the queue is full and its mean is ``>= cos_threshold``
      (0.4), ``T_layer <- int(T_layer * gamma_proj)`` (gamma 2) and the queue is
      cleared (the reference never clears it, so it would keep doubling at every
      later refresh).

    Visible per layer: ``state["proj_gap"]`` (current ``T_layer``) and
    ``state["svd_count"]`` (SVDs done), both CPU int64 tensors; :meth:`refresh_stats`
    lists them and :attr:`svd_count` sums the SVDs.

    Defaults (Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and
    Layer-Adaptive Low-Rank Gradients", arXiv:2407.08296, and its q-galore-torch code):
    ``update_proj_gap=200``, ``scale=0.25``, ``quant_group_size=256``,
    ``cos_threshold=0.4``, ``gamma_proj=2``, ``queue_size=5``; ``eps=1e-8`` as q-galore-torch. The paper's scripts use
    ``betas=(0.9, 0.95)``. Weight decay uses torch's order (decay first).

    ``moment_bits`` / ``block_size`` / ``min_8bit_size`` as :class:`GaLoreAdamW` (8-bit
    moments also on INT8 QLinear weights, projected or plain). ``refresh`` (``"svd"``,
    ``"sample"``: SARA, ``"random"``: GoLore after ``random_after`` steps) and ``refresh_seed``
    as :class:`GaLoreAdamW` (a random refresh does no SVD and does not count in
    ``svd_count``); ``moment_transport`` is not supported here.

    State per projected parameter (tensors only): ``step``, ``side``, ``exp_avg``,
    ``exp_avg_sq`` (as GaLore, in the ``moment_bits`` format), ``proj_packed`` (uint8), ``proj_scale``,
    ``proj_min`` (float32) when quantized, else ``projector``; ``proj_gap``,
    ``svd_count``, ``sim_queue`` (float32, ``queue_size``), ``sim_count`` (CPU
    int64) and, with ``similarity="abs_cos"``, ``past_vector`` (the previous top
    singular vector, float32).
    """

    proj_types = ("std", "reverse_std", "left", "right")
    host_state_keys = LowRankOptimizer.host_state_keys | {"proj_gap", "svd_count", "sim_queue", "sim_count"}
    supports_moment_transport = False
    _no_transport_reason = ("its refresh (INT4-packed projector, adaptive gap) does not transport moments; "
                            "use GaLoreAdamW(moment_transport=True)")
    #: float32 elements of one INT8 update panel (an instance attribute may override it).
    int8_panel_elems: int = INT8_PANEL_ELEMS

    @shared_signature(eps=1e-8, scale=0.25)
    def __init__(
        self,
        params,
        *,
        quant: bool = True,
        quant_group_size: int = 256,
        quant_n_bit: int = 4,
        cos_threshold: float = 0.4,
        gamma_proj: float = 2,
        queue_size: int = 5,
        similarity: str = "abs_cos",
        stochastic_round: bool = True,
        seed: int = 0,
        svd: str = "exact",
        refresh: str = "svd",
        random_after: int = 0,
        refresh_seed: int = 0,
        **options: Unpack[SharedOptions],
    ):
        self.seed = int(seed)
        defaults = OptimizerConfig.from_arguments(locals()).defaults(
            svd=svd, refresh=refresh, random_after=random_after, refresh_seed=refresh_seed, quant=quant, quant_group_size=quant_group_size, quant_n_bit=quant_n_bit,
            cos_threshold=cos_threshold, gamma_proj=gamma_proj, queue_size=queue_size, similarity=similarity, stochastic_round=stochastic_round,
        )
        # GaLoreAdamW.__init__ fixes its own defaults; build the base with ours.
        LowRankOptimizer.__init__(self, params, defaults)

    # ------------------------------------------------------------------ validation
    def _validate_lowrank_group(self, group, gi):
        super()._validate_lowrank_group(group, gi)
        g = group
        if not isinstance(g.get("quant"), bool):
            raise ValueError(self._err(gi, f"quant must be a bool, got {g.get('quant')!r}"))
        qgs = g.get("quant_group_size")
        if not (isinstance(qgs, int) and not isinstance(qgs, bool) and qgs >= 2 and qgs % 2 == 0):
            raise ValueError(self._err(gi, f"quant_group_size must be a positive even int, got {qgs!r}"))
        if g.get("quant_n_bit") != 4:
            raise ValueError(self._err(gi, f"quant_n_bit must be 4 (packed INT4 projector), got {g.get('quant_n_bit')!r}"))
        thr = g.get("cos_threshold")
        if not isinstance(thr, (int, float)) or isinstance(thr, bool) or not math.isfinite(thr):
            raise ValueError(self._err(gi, f"cos_threshold must be a finite float, got {thr!r}"))
        gamma = g.get("gamma_proj")
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma >= 1:
            raise ValueError(self._err(gi, f"gamma_proj must be a number >= 1, got {gamma!r}"))
        qs = g.get("queue_size")
        if not (isinstance(qs, int) and not isinstance(qs, bool) and qs >= 1):
            raise ValueError(self._err(gi, f"queue_size must be an int >= 1, got {qs!r}"))
        if g.get("similarity") not in SIMILARITIES:
            raise ValueError(self._err(gi, f"similarity must be one of {SIMILARITIES}, got {g.get('similarity')!r}"))
        if not isinstance(g.get("stochastic_round"), bool):
            raise ValueError(self._err(gi, f"stochastic_round must be a bool, got {g.get('stochastic_round')!r}"))

    # ------------------------------------------------------------------ state
    def _init_state(self, p, state, group):
        super()._init_state(p, state, group)
        state["proj_gap"] = torch.tensor(int(group["update_proj_gap"]), dtype=torch.int64)
        state["svd_count"] = torch.tensor(0, dtype=torch.int64)
        state["sim_queue"] = torch.zeros(int(group["queue_size"]), dtype=torch.float32)
        state["sim_count"] = torch.tensor(0, dtype=torch.int64)

    def _has_projector(self, state):
        return "proj_packed" in state or "projector" in state

    def _should_refresh(self, p, state, group, step):
        # proj_gap through its host mirror: a non-refresh step reads no tensor value.
        return not self._has_projector(state) or (step - 1) % self._host_int(state["proj_gap"]) == 0

    def _proj_shape(self, p, state, group):
        m, n = p.shape
        r = self._group_rank(group, (m, n))
        return (r, n) if self._side(state) == "right" else (m, r)

    def _get_projector(self, p, state, group):
        if "proj_packed" in state:
            return ops.Int4Projector(
                state["proj_packed"], state["proj_scale"], state["proj_min"], self._proj_shape(p, state, group),
                int(group["quant_group_size"]),
            )
        return state["projector"]

    def _compute_projector(self, p, grad, state, group, step):
        """The new projector in float32 (``Vh[:r]`` or ``U[:, :r]``; ``refresh="sample"`` /
        ``"random"``: the sampled / random factor), or None when the SVD failed;
        :meth:`_refresh_projector` packs it to INT4."""
        side = self._side(state)
        factors = self._select_factors(p, grad, group, step, side)  # refresh="svd" | "sample" | "random"
        if factors is None:
            return None
        new = (factors[1] if side == "right" else factors[0]).to(torch.float32).contiguous()
        if not bool(torch.isfinite(new).all()):  # one host sync, on refresh steps only
            return None
        return new

    def _placeholder_projector(self, p, grad, state, group, step):
        """float32 zeros of the projector's shape (``init_state``: no SVD)."""
        return torch.zeros(self._proj_shape(p, state, group), dtype=torch.float32, device=p.device)

    def _refresh_projector(self, p, grad, state, group, step):
        new = self._compute_projector(p, grad, state, group, step)
        if new is None:
            return False
        side = self._side(state)
        self._adapt_gap(state, group, new, side, p)
        if group["quant"]:
            packed, scale, minimum = ops.int4_pack(new, int(group["quant_group_size"]))
            # In place once they exist (same shapes): a captured CUDA graph stays valid.
            assign_(state, "proj_packed", packed)
            assign_(state, "proj_scale", scale)
            assign_(state, "proj_min", minimum)
        else:
            assign_(state, "projector", new.to(p.dtype))
        if not _refresh.is_random(group, step):  # a GoLore refresh draws its projector without an SVD
            state["svd_count"] += 1
        return True

    def _adapt_gap(self, state, group, new, side, p):
        """Queue the similarity to the previous projector; double the gap when stable.

        ``abs_cos`` keeps the previous top singular vector (float32, ``n`` or ``m``
        values); ``overlap`` compares with the projector in use (dequantized for the
        comparison only, so no dense copy is kept).
        """
        kind = group["similarity"]
        if kind == "abs_cos":
            past = state.get("past_vector")
            if past is not None:
                past = past[None, :] if side == "right" else past[:, None]
        else:
            past = None
            if self._has_projector(state):
                past = self._get_projector(p, state, group)
                past = past.dequantize(torch.float32) if isinstance(past, ops.Int4Projector) else past
        if past is not None:
            sim = projector_similarity(past, new, side, kind)
            q, cnt = state["sim_queue"], int(state["sim_count"])
            size = q.numel()
            if cnt == size:  # drop the oldest
                q[:-1] = q[1:].clone()
                cnt -= 1
            q[cnt] = sim.to("cpu", torch.float32)
            cnt += 1
            if cnt == size and float(q.mean()) >= group["cos_threshold"]:
                assign_(state, "proj_gap",
                        torch.tensor(int(int(state["proj_gap"]) * group["gamma_proj"]), dtype=torch.int64))
                q.zero_()
                cnt = 0
            assign_(state, "sim_count", torch.tensor(cnt, dtype=torch.int64))
        if kind == "abs_cos":
            assign_(state, "past_vector", (new[0] if side == "right" else new[:, 0]).clone())

    # ------------------------------------------------------------------ the step
    def _sr_seed(self, p, step: int) -> int:
        return mix_seed(self.seed, self._param_seed(p), step)

    def _apply_int8(self, mod, p, update, group, step, decay):
        """``W <- decay * W + update`` on QLinear ``mod``'s INT8 storage (whole weight)."""
        self._apply_int8_rows(mod, 0, mod.out_features, update, group, self._sr_seed(p, step), decay)

    def _apply_int8_rows(self, mod, r0, r1, update, group, seed, decay):
        """``W[r0:r1] <- decay * W[r0:r1] + update`` on ``mod``'s INT8 storage; rows ``r0`` and
        ``r1`` lie on quantization-group boundaries (or ``r1`` is the last row)."""
        n, gs = mod.in_features, mod.group_size
        g0, g1 = (r0 * n) // gs, -(-(r1 * n) // gs)
        q, scale, minimum = mod.weight_q[r0:r1], mod.weight_scale[g0:g1], mod.weight_min[g0:g1]
        if group.get("stochastic_round", True):
            ops.int8_update_sr_(q, scale, minimum, update, decay=decay, alpha=1.0, seed=seed, group_size=gs)
        else:
            w = ops.int8_dequantize(q, scale, minimum, group_size=gs, dtype=torch.float32).mul_(decay).add_(update)
            q_new, s_new, m_new = ops.int8_quantize(w, gs)
            q.copy_(q_new)
            scale.copy_(s_new)
            minimum.copy_(m_new)

    def _project_step(self, p, grad, state, group, step):
        mod = qlinear_of(p)
        if mod is None:
            return super()._project_step(p, grad, state, group, step)
        beta1, beta2 = group["betas"]
        side = self._side(state)
        proj = self._get_projector(p, state, group)
        n = ops.project_adam_(grad, proj, state["exp_avg"], state["exp_avg_sq"], side=side, beta1=beta1,
                              beta2=beta2, eps=group["eps"], **self._moment_kwargs(p, state, group, step))
        step_size = adam_step_size(group["lr"], beta1, beta2, step)
        alpha = -step_size * group["scale"]
        decay = 1.0 - group["lr"] * group["weight_decay"]
        rows, cols = p.shape
        rank = self._group_rank(group, (rows, cols))
        panels = int8_panels(rows, cols, mod.group_size, rank, int(self.int8_panel_elems))
        seed = self._sr_seed(p, step)
        # One float32 scratch of the largest panel, reused: never a full-size float32 update
        # (unless the whole weight fits in one panel).
        scratch = torch.zeros(max(r1 - r0 for r0, r1 in panels), cols, dtype=torch.float32, device=p.device)
        if side == "left" and len(panels) > 1 and isinstance(proj, ops.Int4Projector):
            proj = proj.dequantize(torch.float32)  # m x rank: low-rank size; its rows are sliced below
        for k, (r0, r1) in enumerate(panels):
            buf = scratch[: r1 - r0]
            if k:
                buf.zero_()
            if len(panels) == 1:
                ops.backproject_apply_(buf, n, proj, side=side, alpha=alpha, decay=0.0)
            elif side == "right":
                ops.backproject_apply_(buf, n[r0:r1], proj, side=side, alpha=alpha, decay=0.0)
            else:
                ops.backproject_apply_(buf, n, proj[r0:r1], side=side, alpha=alpha, decay=0.0)
            self._apply_int8_rows(mod, r0, r1, buf, group, seed if k == 0 else mix_seed(seed, k), decay)

    def _bucket_key(self, p, state, group):
        """A bucket per (projector kind, side, dtypes, betas, eps, group size, moment format) for the
        plain weights of this class's own step (not INT8 QLinear weights, not DTensors)."""
        if not self._own_fused_step(QGaLoreAdamW) or qlinear_of(p) is not None or type(p) not in _PLAIN_TENSORS:
            return None  # INT8 weights and FSDP2 (DTensor) weights step per parameter
        side = self._side(state)
        if side not in ("left", "right"):
            return None
        if "proj_packed" in state:
            kind = ("int4", int(group["quant_group_size"]), state["proj_scale"].dtype)
        else:
            kind = ("dense", state["projector"].dtype)
        beta1, beta2 = group["betas"]
        return ("qgalore", kind, side, p.device, p.dtype, state["exp_avg"].dtype, beta1, beta2, group["eps"],
                moments.bucket_part(state, moments.format_of(group)))

    def _bucket_step(self, key, entries, skip=None, coeffs=None):
        """One ``ops.foreach_project_update_backproject_`` call with what :meth:`_project_step`
        (GaLore's fused step with the INT4 or dense projector) passes per parameter."""
        _, kind, side, _, _, _, beta1, beta2, eps, _ = key
        if kind[0] == "int4":  # _get_projector with the side and group size of the key
            gs, right = kind[1], side == "right"
            projs = [ops.Int4Projector(st["proj_packed"], st["proj_scale"], st["proj_min"],
                                       (self._group_rank(g, p.shape), p.shape[1]) if right
                                       else (p.shape[0], self._group_rank(g, p.shape)), gs)
                     for p, st, g, _ in entries]
        else:
            projs = [st["projector"] for _, st, _, _ in entries]
        ops.foreach_project_update_backproject_(
            [p for p, _, _, _ in entries], [p.grad for p, _, _, _ in entries],
            projs, [st["exp_avg"] for _, st, _, _ in entries],
            [st["exp_avg_sq"] for _, st, _, _ in entries], side=side, lr=[g["lr"] for _, _, g, _ in entries],
            beta1=beta1, beta2=beta2, eps=eps, step=[t for _, _, _, t in entries],
            weight_decay=[g["weight_decay"] for _, _, g, _ in entries],
            scale=[g["scale"] * self._post_decay(g) for _, _, g, _ in entries],
            **self._foreach_moment_kwargs(entries),
        )

    def _plain_step(self, group, params):
        dense = [p for p in params if qlinear_of(p) is None]
        if dense:
            super()._plain_step(group, dense)
        for p in params:
            mod = qlinear_of(p)
            if mod is not None:
                self._plain_int8_step(mod, p, group)

    def _plain_int8_step(self, mod, p, group):
        """torch.optim.AdamW's math on a QLinear weight, applied to its INT8 storage (8-bit and
        16-bit moments: ``ops.adam_update_`` with ``eps sqrt(1 - b2^t)``, as the base's plain step)."""
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            fmt = moments.format_of(group)
            if moments.bits_for(tuple(p.shape), fmt) != 32:
                moments.init(state, fmt, tuple(p.shape), device=p.device, param_dtype=p.dtype)
            else:
                state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        state["step"] += 1
        step = int(state["step"])
        beta1, beta2 = group["betas"]
        if moments.is_lowbit(state, moments.format_of(group)):
            bc2 = 1 - beta2**step
            g = p.grad.to(moments.update_dtype(state, p.grad.dtype))
            n = ops.adam_update_(g, state["exp_avg"], state["exp_avg_sq"], beta1=beta1,
                                 beta2=beta2, eps=group["eps"] * math.sqrt(bc2),
                                 **self._moment_kwargs(p, state, group, step))
            update = n.to(torch.float32).mul_(-group["lr"] * math.sqrt(bc2) / (1 - beta1**step))
            self._apply_int8(mod, p, update, group, step, 1.0 - group["lr"] * group["weight_decay"])
            return
        g = p.grad.to(torch.float32)
        state["exp_avg"].lerp_(g, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bc1 = 1 - beta1**step
        bc2 = 1 - beta2**step
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bc2)).add_(group["eps"])
        update = state["exp_avg"] / denom
        update.mul_(-group["lr"] / bc1)
        self._apply_int8(mod, p, update, group, step, 1.0 - group["lr"] * group["weight_decay"])

    # ------------------------------------------------------------------ reporting
    def refresh_stats(self) -> List[Dict[str, Any]]:
        """Per projected parameter: its position, shape, current gap and SVD count."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p, {})
                if "proj_gap" in st:
                    out.append({
                        "param": self._param_seed(p), "shape": tuple(p.shape), "proj_gap": int(st["proj_gap"]),
                        "svd_count": int(st["svd_count"]), "int8_weight": qlinear_of(p) is not None,
                    })
        return out

    @property
    def svd_count(self) -> int:
        """SVDs done so far, summed over the parameters."""
        return sum(s["svd_count"] for s in self.refresh_stats())

    def projector_nbytes(self) -> int:
        """Bytes held by the projectors (packed nibbles + group stats, or dense)."""
        total = 0
        for st in self.state.values():
            for k in ("proj_packed", "proj_scale", "proj_min", "projector"):
                if k in st:
                    total += st[k].numel() * st[k].element_size()
        return total
