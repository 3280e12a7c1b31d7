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


def check_missing_package_message(adapter, fmt: str, requirement: str, registry, error_type) -> None:
    """A copy of the adapter pointed at a package that does not exist: clear install advice."""
    import copy
    broken = copy.copy(adapter)
    broken.package = f"{adapter.package}_not_installed_xyz"
    registry._IMPORT_CACHE.clear()
    try:
        with pytest.raises(error_type) as info:
            registry.check_usable(broken, fmt, "cpu")
    finally:
        registry._IMPORT_CACHE.clear()
    message = str(info.value)
    assert requirement in message and "pip install" in message
    assert adapter.missing_package() is None
