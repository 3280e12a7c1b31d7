"""Checks the per-backend tests share, each with that backend's own stated bounds."""
from __future__ import annotations

import pytest
import torch

from .draws import gaussian, heavy_tailed, rel_err


def check_round_trip(adapter, name: str, dist: str, bound: float) -> None:
    spec = adapter.formats[name]
    w = gaussian((256, 512)) if dist == "gaussian" else heavy_tailed((256, 512))
    back = adapter.dequantize(adapter.quantize(w, spec), spec, w.shape, torch.float32)
    err = rel_err(back, w)
    print(f"{spec.id} {dist}: relative error {err:.4f} (bound {bound})")
    assert back.shape == w.shape and back.dtype == torch.float32
    assert err < bound


def check_plain_parts_with_honest_size(adapter, name: str, parts_nbytes) -> None:
    spec = adapter.formats[name]
    w = gaussian((256, 512))
    parts = adapter.quantize(w, spec)
    assert "weight" in parts
    for key, t in parts.items():
        assert type(t) is torch.Tensor, key
        assert not t.requires_grad and t.is_contiguous(), key
    bits = parts_nbytes(parts) * 8 / w.numel()
    print(f"{spec.id}: {bits:.4f} bits per weight stored (spec {spec.bits_per_weight:.4f})")
    assert bits == pytest.approx(spec.bits_per_weight, rel=0.02)
