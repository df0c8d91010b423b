"""``QLinear``: a Linear layer whose weight lives in INT8 (Q-GaLore's weight side).

Storage (buffers, in the state dict): ``weight_q`` (uint8, ``out x in``),
``weight_scale`` and ``weight_min`` (float32, one per group of ``group_size``
consecutive row-major elements), see :func:`lowrank_kernels.ops.int8_quantize`.
The forward and the backward dequantize the weight on the fly
(:func:`lowrank_kernels.ops.int8_dequantize`, a transient ``out x in`` tensor freed
right after its matmul) and never keep a float copy.

How the optimizer gets a float gradient: ``weight`` is an ``nn.Parameter`` of shape
``(out, in)`` and the layer's compute dtype that *owns one element of memory* (a
stride-0 expansion of a single zero). It is never read; it exists so that autograd
has a leaf to accumulate the float weight gradient into, so ``weight.grad`` is a
regular ``out x in`` float tensor, the parameter shows up in ``model.parameters()``
and in ``lowrank_param_groups`` (``QLinear`` is an ``nn.Linear`` subclass), and
:class:`lowrank_kernels.optim.QGaLoreAdamW` finds the INT8 storage through
:func:`qlinear_of` and updates it with stochastic rounding. An optimizer that does
not know ``QLinear`` fails loudly when it writes into the placeholder (in-place
writes into a stride-0 tensor raise) instead of silently training nothing.

Memory per weight element: 1 byte + 8 bytes per group (0.03 B at group 256), against
2 (bf16) or 4 (fp32) bytes; the gradient is float, like any Linear's.
"""
from __future__ import annotations

import weakref
from typing import Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_kernels import ops


def _placeholder(shape, dtype, device) -> torch.Tensor:
    return torch.zeros(1, dtype=dtype, device=device).expand(*shape)


class _QLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` dequantized from INT8 in forward and again in backward.

    Inputs: ``x, weight_placeholder, q, scale, minimum, bias, group_size``. The
    weight gradient is returned for ``weight_placeholder`` (float, the placeholder's dtype).
    """

    @staticmethod
    def forward(ctx, x, placeholder, q, scale, minimum, bias, group_size):
        w = ops.int8_dequantize(q, scale, minimum, group_size=group_size, dtype=x.dtype)
        out = F.linear(x, w, bias.to(x.dtype) if bias is not None else None)
        ctx.save_for_backward(x, q, scale, minimum)
        ctx.group_size = group_size
        ctx.has_bias = bias is not None
        ctx.w_dtype = placeholder.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, q, scale, minimum = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w = ops.int8_dequantize(q, scale, minimum, group_size=ctx.group_size, dtype=grad_out.dtype)
            grad_x = grad_out @ w
            del w
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = (g2.T @ x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_b = g2.sum(0).to(ctx.b_dtype)
        return grad_x, grad_w, None, None, None, grad_b, None


class QLinear(nn.Linear):
    """A Linear layer with an INT8 weight (asymmetric, per group), dequantized on the fly.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        group_size: elements per quantization group (default 256, Q-GaLore's).
        device, dtype: of the bias and of the computation (the weight is always INT8).

    The weight starts as ``nn.Linear``'s default initialization, quantized. Use
    :meth:`from_linear` to convert an existing layer and :func:`quantize_linear_layers`
    for a whole model. ``weight`` is a gradient placeholder (see the module doc);
    :meth:`dequantized_weight` gives the float weight. ``load_state_dict`` accepts
    a QLinear state dict or a plain ``nn.Linear`` one (its float ``weight`` is
    quantized on load).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 256,
                 device=None, dtype=None):
        nn.Module.__init__(self)
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"QLinear: group_size must be a positive int, got {group_size!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        dtype = dtype or torch.get_default_dtype()
        w = torch.empty(out_features, in_features, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(w, a=5**0.5)
        q, s, mn = ops.int8_quantize(w, group_size)
        self.register_buffer("weight_q", q)
        self.register_buffer("weight_scale", s)
        self.register_buffer("weight_min", mn)
        self.weight = nn.Parameter(_placeholder((out_features, in_features), dtype, device))
        self.weight._qlinear = weakref.ref(self)
        if bias:
            bound = 1 / in_features**0.5 if in_features > 0 else 0
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """Re-initialize as ``nn.Linear`` does (then quantize the weight)."""
        w = torch.empty(self.out_features, self.in_features, device=self.weight_q.device)
        nn.init.kaiming_uniform_(w, a=5**0.5)
        self.set_weight(w)
        if self.bias is not None:
            bound = 1 / self.in_features**0.5 if self.in_features > 0 else 0
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 256) -> "QLinear":
        """A QLinear holding ``linear``'s weight quantized to INT8 (and its bias, copied)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, group_size=group_size,
                  device=w.device, dtype=w.dtype)
        mod.set_weight(w)
        if linear.bias is not None:
            with torch.no_grad():
                mod.bias.copy_(linear.bias.detach())
        mod.train(linear.training)
        return mod

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        """Quantize the float tensor ``w`` (``out x in``) into this layer's INT8 storage."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"QLinear.set_weight: w must have shape {(self.out_features, self.in_features)}, got {tuple(w.shape)}"
            )
        q, s, mn = ops.int8_quantize(w.to(self.weight_q.device), self.group_size)
        self.weight_q.copy_(q)
        self.weight_scale.copy_(s)
        self.weight_min.copy_(mn)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float weight ``min + s q`` (a new tensor; the layer's dtype by default)."""
        return ops.int8_dequantize(
            self.weight_q, self.weight_scale, self.weight_min, group_size=self.group_size,
            dtype=dtype or self.weight.dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QLinearFunction.apply(
            x, self.weight, self.weight_q, self.weight_scale, self.weight_min, self.bias, self.group_size
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}, weight=int8")

    # ------------------------------------------------------------------ storage bookkeeping
    def weight_nbytes(self) -> int:
        """Bytes of the weight's storage: INT8 values plus the per-group scale and minimum."""
        return sum(t.numel() * t.element_size() for t in (self.weight_q, self.weight_scale, self.weight_min))

    def _apply(self, fn, recurse=True):
        # Keep the placeholder one element (a plain .to() would materialize it) and keep
        # the group statistics float32 whatever dtype the module is cast to.
        w = self._parameters["weight"]
        self._parameters["weight"] = None  # skipped by nn.Module, keeps the parameter order
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = w
        probe = fn(torch.zeros(1, dtype=w.dtype, device=w.device))
        w.data = _placeholder((self.out_features, self.in_features), probe.dtype, probe.device)
        if w.grad is not None:
            w.grad = fn(w.grad)
        self.weight_scale = self.weight_scale.float()
        self.weight_min = self.weight_min.float()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w = self._parameters["weight"]
        self._parameters["weight"] = None  # skipped by nn.Module, keeps the parameter order
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._parameters["weight"] = w

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        float_w = state_dict.get(key)
        if float_w is not None and (prefix + "weight_q") not in state_dict:
            # A plain nn.Linear state dict: quantize its weight.
            state_dict = dict(state_dict)
            q, s, mn = ops.int8_quantize(float_w.to(self.weight_q.device), self.group_size)
            state_dict[prefix + "weight_q"], state_dict[prefix + "weight_scale"], state_dict[prefix + "weight_min"] = (
                q, s, mn)
            del state_dict[key]
        w = self._parameters["weight"]
        self._parameters["weight"] = None  # skipped by nn.Module, keeps the parameter order
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            self._parameters["weight"] = w
        if key in state_dict and key in unexpected_keys:
            unexpected_keys.remove(key)

    def __setstate__(self, state):
        super().__setstate__(state)
        w = self._parameters.get("weight")
        if w is not None:
            w._qlinear = weakref.ref(self)


def qlinear_of(param: torch.Tensor) -> Optional[QLinear]:
    """The :class:`QLinear` whose gradient placeholder ``param`` is, else None."""
    ref = getattr(param, "_qlinear", None)
    mod = ref() if ref is not None else None
    if mod is not None and mod._parameters.get("weight") is param:
        return mod
    return None


def quantize_linear_layers(
    model: nn.Module, target_modules: Optional[Sequence[str]] = None, group_size: int = 256,
    exclude: Iterable[str] = (),
) -> List[str]:
    """Replace the ``nn.Linear`` submodules of ``model`` by :class:`QLinear`, in place.

    A Linear is converted when its qualified name contains one of ``target_modules``
    (every Linear when None; Q-GaLore's scripts use ``("attn", "mlp")``) and none of
    ``exclude`` (e.g. ``("lm_head",)``). Weights are quantized, biases copied.
    Returns the names of the converted modules.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_linear_layers: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    if isinstance(exclude, str):
        exclude = (exclude,)
    exclude = tuple(exclude)
    todo = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, QLinear):
            continue
        if target_modules is not None and not any(t in name for t in target_modules):
            continue
        if any(e in name for e in exclude):
            continue
        todo.append(name)
    for name in todo:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QLinear.from_linear(getattr(parent, child), group_size=group_size))
    return todo
