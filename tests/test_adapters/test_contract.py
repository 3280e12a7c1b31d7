"""One contract every backend format meets on the CPU (pure torch, no ComfyUI).

Errors are read against the float weights and float64 products of them (not against the
format's own dequantizer), inside the bounds of harness/tolerances.py.
How to see these fail: store torchao's int8 scale 3 % too large (done: int8wo's round trip
leaves its band); a Q8_0 that stored Q6_K's error (1.7 %) would leave Q8_0's band
(0.28-0.88 %), an int8 in place of an fp8 format falls below fp8's (1.8-3.6 %); make
QuantizedLinear add its bias twice, or flip the conv's kernel (the products leave theirs)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import pack_module
from harness.draws import rel_err
from harness.formats import cpu_format_ids
from harness.tolerances import activation_error, product_bound, rounding_bound, weight_error_band
from harness.tiny_models import heavy_tailed

registry = pack_module("backends.engine.registry")
base = pack_module("backends.engine.base")
modules = pack_module("backends.engine.modules")

CPU_FORMATS = cpu_format_ids(registry, base.hardware_problem)


@pytest.fixture(params=CPU_FORMATS, ids=CPU_FORMATS)
def fmt(request):
    return registry.get_format(request.param)


def error_beside_exact_bias(got, product, bias) -> float:
    """||got - (product + bias)|| / ||product||: the bias is exact, so the error is relative
    to the product the weight error acts on (tolerances.py, product_bound)."""
    return ((got.double() - product - bias.double()).norm() / product.norm()).item()


def test_all_four_backends_are_registered():
    """Shown able to fail: the @register decorator removed from QuantoAdapter in
    adapters/quanto.py -> 'quanto' is missing from registry.adapters() (subset fails)."""
    assert {"torchao", "bnb", "quanto", "gguf"} <= set(registry.adapters())
    assert len(CPU_FORMATS) >= 12


def test_round_trip_plain_parts_and_bytes(fmt):
    """Round trip inside the format's band (Gaussian and heavy-tailed), plain parts, honest
    bytes.
    Shown able to fail: "scale": scale * 1.03 in adapters/torchao.py's _quantize_int8 (the
    scale stored 3 % too large) -> int8wo and int8dq leave their band (0.031 > 0.0125)."""
    adapter, spec = fmt
    gaussian = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    for name, w in (("gaussian", gaussian), ("heavy", heavy_tailed((512, 1024), 1))):
        parts = adapter.quantize(w, spec)
        assert "weight" in parts
        assert all(type(t) is torch.Tensor for t in parts.values()), "parts must be plain tensors"
        back = adapter.dequantize(parts, spec, w.shape, torch.float32)
        assert back.shape == w.shape and back.dtype == torch.float32
        err = rel_err(back, w)
        low, high = weight_error_band(spec.id, spec.bits_per_weight, heavy=name == "heavy")
        print(f"{spec.id} {name}: weight error {err:.4f} (band {low:.4f}-{high:.4f})")
        assert low <= err <= high
        stored = base.parts_nbytes(parts)
        assert stored == pytest.approx(w.numel() * spec.bits_per_weight / 8, rel=0.03)


def test_quantized_linear_matches_dequantized_math(fmt):
    """QuantizedLinear against the float64 product of the float weights, inside
    product_bound of the weight error (tolerances.py).
    Shown able to fail: QuantizedLinear.forward (engine/modules.py) returning
    adapter.linear(...) + self._bias_for(x) (bias added twice) -> 1.45-1.62 against bounds of
    0.035-0.13 (int8wo, nf4, nf4dq, Q4_K checked); the layer's product scaled by 1.05 ->
    Q4_K 0.103 > 0.096, nf4 0.135 > 0.130, Q8_0 0.051 > 0.0095 (1.25 x the weight error
    measured beside the bias let the 4-bit ones pass)."""
    adapter, spec = fmt
    lin = nn.Linear(1024, 256)
    with torch.no_grad():
        lin.weight.copy_(heavy_tailed((256, 1024), 2))
        lin.bias.normal_()
    parts = adapter.quantize(lin.weight.detach(), spec)
    q = modules.make_quantized(lin, adapter, spec, parts, lin.bias.detach())
    x = torch.randn(2, 33, 1024, generator=torch.Generator().manual_seed(3))
    product = F.linear(x.double(), lin.weight.double())
    weight_err = rel_err(q.dequantized_weight(torch.float32), lin.weight)
    got = q(x)
    assert got.shape == (2, 33, 256)
    err = error_beside_exact_bias(got, product, lin.bias)
    slack = activation_error(spec.id) + rounding_bound(torch.float32, 1024)
    print(f"{spec.id}: output error {err:.4f}, weight error {weight_err:.4f}")
    # random inputs carry the weight error into the output one to one (tolerances.py)
    assert err < product_bound(weight_err, got.numel()) + slack
    # and the product is as good as the format's physics promises, whatever dequantize says
    physics = weight_error_band(spec.id, spec.bits_per_weight, heavy=True)[1]
    assert err < product_bound(physics, got.numel()) + slack
    names = set(q.state_dict())
    assert "weight" in names and "bias" in names
    assert q.stored_bytes() == sum(t.nelement() * t.element_size() for t in q.state_dict().values())


def test_quantized_conv_matches_dequantized_math(fmt):
    """QuantizedConv against the float64 conv of the float weights, inside product_bound.
    Shown able to fail: conv(x, w.flip(-1), ...) in QuantizedConv.forward (engine/modules.py)
    -> 1.13-1.15 against bounds of 0.004-0.099 (int8wo, nf4, nf4dq, Q4_K checked); the
    output scaled by 1.05 -> Q4_K 0.075 > 0.059; padding 0 instead of self.padding -> the
    output shapes differ (RuntimeError)."""
    adapter, spec = fmt
    conv = nn.Conv2d(256, 128, 3, padding=1)  # 256*3*3 inputs: whole GGUF blocks
    if not spec.conv_ok:
        assert "matrices only" in adapter.supports_shape(spec, conv.weight.shape)
        return
    parts = adapter.quantize(conv.weight.detach(), spec)
    q = modules.make_quantized(conv, adapter, spec, parts, conv.bias.detach())
    x = torch.randn(1, 256, 12, 12, generator=torch.Generator().manual_seed(4))
    product = F.conv2d(x.double(), conv.weight.double(), padding=1)
    weight_err = rel_err(q.dequantized_weight(torch.float32), conv.weight)
    got = q(x)
    err = error_beside_exact_bias(got, product, conv.bias.reshape(-1, 1, 1))
    rounding = rounding_bound(torch.float32, 256 * 3 * 3)
    print(f"{spec.id}: output error {err:.4f}, weight error {weight_err:.4f}")
    assert err < product_bound(weight_err, got.numel()) + rounding
    # PyTorch's default conv init is uniform: within the Gaussian band's upper edge
    physics = weight_error_band(spec.id, spec.bits_per_weight)[1]
    assert err < product_bound(physics, got.numel()) + rounding
