"""Checks the per-backend tests share, each with that backend's own stated bounds."""
from __future__ import annotations

import pytest
import torch

from .draws import gaussian
from .tolerances import weight_error_band


def assert_weight_in_band(spec, err: float, heavy: bool, what: str) -> None:
    """A round trip's relative error inside the format's rate-distortion band (tolerances.py)."""
    low, high = weight_error_band(spec.id, spec.bits_per_weight, heavy)
    print(f"{spec.id} {what}: relative error {err:.4f} (band {low:.4f}-{high:.4f})")
    assert low <= err <= high, f"{spec.id} {what}: relative error {err:.4f} outside {low:.4f}-{high:.4f}"


def format_helpers(adapter):
    """spec(name), round_trip(w, name, dtype) -> (parts, float weight) and
    assert_in_band(err, name, heavy, what) for one adapter's formats."""
    def spec(name):
        return adapter.formats[name]

    def round_trip(w, name, dtype=torch.float32):
        parts = adapter.quantize(w, spec(name))
        return parts, adapter.dequantize(parts, spec(name), w.shape, dtype)

    def assert_in_band(err, name, heavy, what):
        assert_weight_in_band(spec(name), err, heavy, what)

    return spec, round_trip, assert_in_band


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
