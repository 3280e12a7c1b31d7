"""One contract every backend format meets on the CPU (pure torch, no ComfyUI)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import pack_module
from harness.formats import cpu_format_ids
from harness.tiny_models import heavy_tailed

registry = pack_module("backends.registry")
base = pack_module("backends.base")
modules = pack_module("backends.modules")
quantize = pack_module("backends.quantize")
recipes = pack_module("backends.recipes")
clone = pack_module("backends.clone")

CPU_FORMATS = cpu_format_ids(registry, base.hardware_problem)


def weight_bound(bits: float) -> float:
    """Relative Frobenius error allowed on a heavy-tailed weight, by stored bits."""
    for limit, bound in ((7.9, 0.04), (5.9, 0.09), (4.9, 0.14), (3.9, 0.3), (2.9, 0.5)):
        if bits >= limit:
            return bound
    return 0.8


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(params=CPU_FORMATS, ids=CPU_FORMATS)
def fmt(request):
    return registry.get_format(request.param)


def test_all_four_backends_are_registered():
    assert {"torchao", "bnb", "quanto", "gguf"} <= set(registry.adapters())
    assert len(CPU_FORMATS) >= 12


def test_round_trip_plain_parts_and_bytes(fmt):
    adapter, spec = fmt
    for name, w in (("gaussian", torch.randn(512, 1024) * 0.02), ("heavy", heavy_tailed((512, 1024), 1))):
        parts = adapter.quantize(w, spec)
        assert "weight" in parts
        assert all(type(t) is torch.Tensor for t in parts.values()), "parts must be plain tensors"
        back = adapter.dequantize(parts, spec, w.shape, torch.float32)
        assert back.shape == w.shape and back.dtype == torch.float32
        err = rel(back, w)
        print(f"{spec.id} {name}: weight error {err:.4f}")
        assert err < weight_bound(spec.bits_per_weight)
        stored = base.parts_nbytes(parts)
        assert stored == pytest.approx(w.numel() * spec.bits_per_weight / 8, rel=0.03)


def test_quantized_linear_matches_dequantized_math(fmt):
    adapter, spec = fmt
    lin = nn.Linear(1024, 256)
    with torch.no_grad():
        lin.weight.copy_(heavy_tailed((256, 1024), 2))
        lin.bias.normal_()
    parts = adapter.quantize(lin.weight.detach(), spec)
    q = modules.make_quantized(lin, adapter, spec, parts, lin.bias.detach())
    x = torch.randn(2, 33, 1024)
    expected = F.linear(x, q.dequantized_weight(torch.float32), lin.bias)
    got = q(x)
    assert got.shape == (2, 33, 256)
    assert rel(got, expected) < 2e-2  # fused kernels may quantize activations (W8A8)
    names = set(q.state_dict())
    assert "weight" in names and "bias" in names
    assert q.stored_bytes() == sum(t.nelement() * t.element_size() for t in q.state_dict().values())


def test_quantized_conv_matches_dequantized_math(fmt):
    adapter, spec = fmt
    conv = nn.Conv2d(256, 128, 3, padding=1)  # 256*3*3 inputs: whole GGUF blocks
    if not spec.conv_ok:
        assert "matrices only" in adapter.supports_shape(spec, conv.weight.shape)
        return
    parts = adapter.quantize(conv.weight.detach(), spec)
    q = modules.make_quantized(conv, adapter, spec, parts, conv.bias.detach())
    x = torch.randn(1, 256, 12, 12)
    expected = F.conv2d(x, q.dequantized_weight(torch.float32), conv.bias, padding=1)
    assert rel(q(x), expected) < 1e-5


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 256)
        self.norm = nn.LayerNorm(256)
        self.body = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
        self.narrow = nn.Linear(256, 96)  # 96 rows, 256 wide
        self.odd = nn.Linear(320, 320)  # 320 is not a multiple of 256 (K-quants)
        self.tiny = nn.Linear(8, 8)
        self.final_layer = nn.Linear(256, 256)


def test_quantize_tree_counts_kept_and_unsupported_layers():
    model = Toy()
    copy = clone.clone_tree(model)
    report = quantize.quantize_tree(copy, "gguf:Q4_K", recipes.get_recipe("generic"), target="toy")
    actions = {r.name: (r.action, r.format_id, r.reason) for r in report.layers}
    assert actions["body.0"][:2] == ("quantized", "gguf:Q4_K")
    assert actions["odd"][0] == "fallback" and actions["odd"][1] == "gguf:Q4_1"
    assert actions["tiny"][0] == "kept" and "tiny" in actions["tiny"][2]
    assert actions["final_layer"][0] == "kept" and "final projection" in actions["final_layer"][2]
    emb_norm = sum(p.numel() * p.element_size() for p in (*model.embed.parameters(), *model.norm.parameters()))
    assert report.other_bytes == emb_norm, "embeddings and norms are counted, in high precision"
    assert report.bytes_after < report.bytes_before
    assert isinstance(copy.body[0], modules.QuantizedLayer)
    assert not isinstance(model.body[0], modules.QuantizedLayer), "the source tree is untouched"


def test_clone_shares_storage_but_not_objects():
    model = Toy()
    copy = clone.clone_tree(model)
    assert copy.body[0].weight is not model.body[0].weight
    assert copy.body[0].weight.data_ptr() == model.body[0].weight.data_ptr()
    copy.body[0].weight.data = torch.zeros_like(copy.body[0].weight)
    assert model.body[0].weight.abs().sum() > 0
