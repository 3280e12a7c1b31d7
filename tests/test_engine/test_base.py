"""The adapter interface and the format description (engine/base.py), on a toy adapter: what
a FormatSpec accepts, when hardware cannot run a format, the shapes the default
supports_shape refuses, the default matmul and the package check. Every real adapter runs
the shared contract in test_adapters/test_contract.py; the format lookup's error is in
test_registry.py."""
from __future__ import annotations

import pytest
import torch

from conftest import pack_module
from harness.tolerances import rounding_bound

base = pack_module("backends.engine.base")


def _spec(**kw):
    return base.FormatSpec(**{"backend": "toy", "name": "f", "bits_per_weight": 8.0, "description": "toy", **kw})


class _Toy(base.BackendAdapter):
    """Stores the weight in fp16: dequantize is exact up to fp16 rounding."""

    name = "toy"
    package = "quantkit_no_such_package"
    pip_requirement = "quantkit-no-such-package>=1"

    def quantize(self, weight, spec):
        return {"weight": weight.half()}

    def dequantize(self, parts, spec, shape, dtype):
        return parts["weight"].to(dtype).reshape(shape)


def test_a_format_spec_keeps_its_bits_and_block_in_range():
    """Shown able to fail: the bits check written `>= 16` -> 16 bits raises ValueError."""
    assert _spec(bits_per_weight=16.0).id == "toy:f"
    for bad in ({"bits_per_weight": 0.0}, {"bits_per_weight": 16.5}, {"block_size": 0}):
        with pytest.raises(ValueError):
            _spec(**bad)


def test_hardware_problems_name_what_the_format_needs(monkeypatch):
    """Shown able to fail: the capability compared with `<=` -> 8.9 itself is refused."""
    cpu = torch.device("cpu")
    assert base.hardware_problem(_spec(), cpu) is None
    assert "needs an NVIDIA GPU" in base.hardware_problem(_spec(needs_cuda=True), cpu)
    assert "needs an NVIDIA GPU" in base.hardware_problem(_spec(cpu_kernels=False), cpu)
    fp8 = _spec(min_compute_capability=(8, 9))
    for have, expected in (((8, 6), "'toy:f' needs compute capability 8.9 or higher; this GPU has 8.6."),
                           ((8, 9), None), ((9, 0), None)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, have=have: have)
        assert base.hardware_problem(fp8, torch.device("cuda")) == expected, have


def test_the_default_shape_check_counts_a_convolutions_flattened_width():
    """A [out, in, kh, kw] weight is stored as [out, in * kh * kw]: that width must be whole
    blocks. Shown able to fail: the width taken as shape[1] alone -> the 4 x 3 x 3 = 36 wide
    convolution is refused for blocks of 12 ('input width 4 ...')."""
    adapter = _Toy()
    assert adapter.supports_shape(_spec(block_size=12), torch.Size((8, 4, 3, 3))) is None
    assert adapter.supports_shape(_spec(block_size=8), torch.Size((8, 4, 3, 3))) == \
        "input width 36 is not a multiple of the block size 8"
    assert adapter.supports_shape(_spec(), torch.Size((8,))) == "not a matrix"


def test_the_default_linear_multiplies_by_the_dequantized_weight():
    """y = x W^T + b with W as stored (fp16), against a float64 product.
    Shown able to fail: the default linear without its bias -> not close (off by the bias, 1.0)."""
    adapter, spec = _Toy(), _spec()
    g = torch.Generator().manual_seed(0)
    w, x, b = torch.randn(16, 32, generator=g), torch.randn(4, 32, generator=g), torch.ones(16)
    y = adapter.linear(x, adapter.quantize(w, spec), spec, w.shape, b)
    expected = x.double() @ w.half().double().T + 1.0
    # a float32 sum of 33 terms is off by rounding_bound(float32, 33) times its terms' sizes
    sizes = x.abs().double() @ w.half().abs().double().T + 1.0
    assert ((y.double() - expected).abs() <= rounding_bound(torch.float32, 33) * sizes).all()
    assert base.parts_nbytes(adapter.quantize(w, spec)) == 16 * 32 * 2


def test_a_format_written_in_torch_needs_no_package():
    """Shown able to fail: missing_package without its needs_package check -> the torch-only
    format reports 'quantkit-no-such-package>=1' missing."""
    adapter = _Toy()
    assert "quantkit-no-such-package>=1" in adapter.missing_package(_spec())
    assert adapter.missing_package(_spec(needs_package=False)) is None
