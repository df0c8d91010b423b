"""QLinear: INT8 weight dequantized on the fly, float gradient through the placeholder,
state dict round trip, dtype moves, model conversion."""
import copy
import io

import pytest
import torch
from torch import nn

from lowrank_kernels import ops
from lowrank_kernels.nn import QLinear, qlinear_of, quantize_linear_layers
from lowrank_kernels.ops import use_backend


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_forward_backward_match_float_linear_on_dequantized_weight(backend):
    if backend == "cpp" and not ops._registry.extension_loaded():
        pytest.skip("extension not built")
    lin = nn.Linear(45, 37)
    q = QLinear.from_linear(lin, group_size=64)
    w = q.dequantized_weight().detach()
    # the stored weight is the Linear's, to half a step per element
    step = q.weight_scale.repeat_interleave(64)[: w.numel()].view(w.shape)
    assert ((w - lin.weight.detach()).abs() <= step / 2 * (1 + 1e-4) + 1e-7).all()
    ref = nn.Linear(45, 37)
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(lin.bias)
    x = torch.randn(3, 5, 45)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with use_backend(backend):
        y = q(x1)
        y.square().sum().backward()
    yr = ref(x2)
    yr.square().sum().backward()
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


def test_placeholder_holds_one_element_and_grad_is_full():
    q = QLinear(300, 200, group_size=256)
    assert q.weight.shape == (200, 300) and q.weight.requires_grad
    assert q.weight.untyped_storage().nbytes() == q.weight.element_size()
    assert q.weight_q.dtype == torch.uint8 and q.weight_q.shape == (200, 300)
    assert q.weight_nbytes() == 200 * 300 + 8 * ((200 * 300 + 255) // 256)
    q(torch.randn(4, 300)).sum().backward()
    assert q.weight.grad.shape == (200, 300) and q.weight.grad.is_contiguous()
    assert qlinear_of(q.weight) is q and qlinear_of(q.bias) is None
    # an optimizer that does not know QLinear fails loudly instead of training nothing
    with pytest.raises(RuntimeError):
        torch.optim.SGD([q.weight], lr=0.1).step()


def test_no_bias_and_half_precision_module():
    q = QLinear(33, 17, bias=False, group_size=32).to(torch.bfloat16)
    assert q.weight.dtype == torch.bfloat16 and q.weight.stride() == (0, 0)
    assert q.weight_scale.dtype == torch.float32 and q.weight_min.dtype == torch.float32
    x = torch.randn(6, 33, dtype=torch.bfloat16, requires_grad=True)
    y = q(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert q.weight.grad.dtype == torch.bfloat16 and x.grad.shape == x.shape


def test_state_dict_round_trip_and_plain_linear_load():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 5))
    plain_sd = copy.deepcopy(model.state_dict())
    names = quantize_linear_layers(model, group_size=64)
    assert names == ["0", "2"]
    sd = model.state_dict()
    assert set(sd) == {f"{i}.{k}" for i in (0, 2) for k in ("bias", "weight_q", "weight_scale", "weight_min")}
    other = nn.Sequential(QLinear(20, 40, group_size=64), nn.ReLU(), QLinear(40, 5, group_size=64))
    other.load_state_dict(_roundtrip(sd))
    x = torch.randn(7, 20)
    assert torch.equal(other(x), model(x))
    for k in sd:
        assert torch.equal(other.state_dict()[k], sd[k])
    # a plain nn.Linear state dict is quantized on load
    third = nn.Sequential(QLinear(20, 40, group_size=64), nn.ReLU(), QLinear(40, 5, group_size=64))
    third.load_state_dict(plain_sd)
    assert torch.equal(third(x), model(x))
    # saving, loading and casting keep the parameter order (optimizer state maps by position)
    model.to(torch.float64).to(torch.float32)
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    # deepcopy keeps the placeholder linked to its own module
    dup = copy.deepcopy(model)
    assert qlinear_of(dup[0].weight) is dup[0]


def test_quantize_linear_layers_targets_and_exclude():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(8, 8)
            self.mlp = nn.Linear(8, 8)
            self.other = nn.Linear(8, 8)

    model = nn.ModuleDict({"b0": Block(), "lm_head": nn.Linear(8, 3)})
    names = quantize_linear_layers(model, target_modules=("attn", "mlp"), exclude=("b0.mlp",), group_size=16)
    assert names == ["b0.attn"]
    assert isinstance(model["b0"].attn, QLinear) and not isinstance(model["b0"].mlp, QLinear)
    assert not isinstance(model["lm_head"], QLinear)
    assert quantize_linear_layers(model, target_modules=("attn",)) == []  # already converted
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        quantize_linear_layers([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        QLinear(4, 4, group_size=0)


@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_forward_backward_on_device(backend, device):
    """The same check on the test device (CUDA under LOWRANK_KERNELS_TEST_DEVICE=cuda), every backend
    that runs there (the INT8 dequantize kernel of Triton included): outputs and gradients elementwise
    at float32 accuracy against nn.Linear on the dequantized weight."""
    from ..conftest import require_backend

    require_backend("quant_int8_dequantize", backend, device)
    lin = nn.Linear(45, 37, device=device)
    q = QLinear.from_linear(lin, group_size=64)
    assert q.weight_q.device.type == torch.device(device).type
    with use_backend(backend):
        w = q.dequantized_weight().detach()
    ref = nn.Linear(45, 37, device=device)
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(lin.bias)
    x = torch.randn(3, 5, 45, device=device)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with use_backend(backend):
        q(x1).square().sum().backward()
    ref(x2).square().sum().backward()
    for a, b in ((x1.grad, x2.grad), (q.weight.grad, ref.weight.grad), (q.bias.grad, ref.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
