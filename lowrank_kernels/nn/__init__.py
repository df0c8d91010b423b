"""Modules the optimizers need: :class:`QLinear` (INT8 weight, dequantized on the fly)."""
from .qlinear import QLinear, qlinear_of, quantize_linear_layers  # noqa: F401

__all__ = ["QLinear", "qlinear_of", "quantize_linear_layers"]
