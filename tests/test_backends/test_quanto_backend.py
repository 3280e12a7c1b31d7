"""optimum-quanto adapter: accuracy, honest sizes, the plain-tensor contract, and agreement
with quanto's own quantized tensors and modules on the same weights."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from quantkit.backends.engine import registry
from quantkit.backends.engine.base import hardware_problem, parts_nbytes
from quantkit.backends.engine.errors import BackendUnavailable
from quantkit.backends.adapters.quanto import QuantoAdapter, unpack_int4
from harness.backend_checks import (check_missing_package_message,
                                    check_plain_parts_with_honest_size, check_round_trip)
from harness.draws import gaussian, heavy_tailed, rel_err

ADAPTER = QuantoAdapter()
ALL = ["int8", "fp8", "int4"]
# Relative Frobenius error bounds (Gaussian, heavy-tailed); measured about 10 % below.
BOUNDS = {"int8": (0.009, 0.025), "fp8": (0.029, 0.028), "int4": (0.11, 0.19)}


def spec(name):
    return ADAPTER.formats[name]


def round_trip(w, name, dtype=torch.float32):
    parts = ADAPTER.quantize(w, spec(name))
    return parts, ADAPTER.dequantize(parts, spec(name), w.shape, dtype)


def test_format_ids_are_the_api():
    assert list(ADAPTER.formats) == ALL
    assert [s.id for s in ADAPTER.formats.values()] == ["quanto:int8", "quanto:fp8", "quanto:int4"]
    int4 = spec("int4")
    assert int4.keep_final_projection and int4.block_size == 128 and int4.fallback == "int8"
    assert int4.bits_per_weight == 4.25


@pytest.mark.parametrize("dist", ["gaussian", "heavy_tailed"])
@pytest.mark.parametrize("name", ALL)
def test_round_trip_error(name, dist):
    check_round_trip(ADAPTER, name, dist, BOUNDS[name][dist == "heavy_tailed"])


@pytest.mark.parametrize("name", ALL)
def test_parts_are_plain_tensors_with_honest_size(name):
    check_plain_parts_with_honest_size(ADAPTER, name, parts_nbytes)


@pytest.mark.parametrize("name", ALL)
def test_conv_weight_round_trip(name):
    w = heavy_tailed((64, 32, 3, 4))  # width 384 = 3 groups of 128
    _, back = round_trip(w, name)
    err = rel_err(back, w)
    print(f"quanto:{name} conv {tuple(w.shape)}: relative error {err:.4f}")
    assert back.shape == w.shape
    assert err < BOUNDS[name][1] * 1.1


def test_int4_needs_whole_groups():
    assert ADAPTER.supports_shape(spec("int4"), torch.Size((64, 200))) is not None
    assert ADAPTER.supports_shape(spec("int8"), torch.Size((64, 200))) is None


def test_all_zero_rows_stay_zero():
    w = gaussian((8, 256))
    w[3] = 0
    for name in ALL:
        _, back = round_trip(w, name)
        assert torch.isfinite(back).all() and back[3].abs().max() == 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ALL)
def test_linear_matches_dequantize(name, dtype):
    w = gaussian((192, 256))
    parts = ADAPTER.quantize(w, spec(name))
    x = gaussian((3, 5, 256), seed=7).to(dtype) * 50
    bias = gaussian((192,), seed=8).to(dtype)
    y = ADAPTER.linear(x, parts, spec(name), w.shape, bias)
    ref = F.linear(x, ADAPTER.dequantize(parts, spec(name), w.shape, dtype), bias)
    assert y.shape == (3, 5, 192) and y.dtype == dtype
    assert rel_err(y, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_eight_bit_matches_quanto_tensor_and_module(name):
    """Same bytes as quanto's own frozen QLinear, same dequantized weight and output."""
    from optimum.quanto import freeze, qtypes, quantize

    w, b = heavy_tailed((96, 256)), gaussian((96,), seed=2)
    lin = torch.nn.Linear(256, 96)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    model = torch.nn.Sequential(lin)
    quantize(model, weights=qtypes[spec(name).qtype])
    freeze(model)
    qweight = model[0].weight
    parts = ADAPTER.quantize(w, spec(name))
    assert torch.equal(parts["weight"].view(torch.uint8), qweight._data.view(torch.uint8))
    assert torch.equal(parts["scale"], qweight._scale)
    assert torch.equal(ADAPTER.dequantize(parts, spec(name), w.shape, torch.float32),
                       qweight.dequantize())
    x = gaussian((4, 256), seed=5) * 50
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(ADAPTER.linear(x, parts, spec(name), w.shape, b), expected,
                          rtol=1e-5, atol=1e-6)


def test_int4_matches_quanto_packing_and_dequantization():
    """quanto's own ops on the same weight: MaxOptimizer scales, quantize_affine codes,
    pack_weights bytes, and the QBitsTensor dequantization."""
    from optimum.quanto import MaxOptimizer, WeightQBitsTensor, qint4

    w = heavy_tailed((96, 384))
    parts = ADAPTER.quantize(w, spec("int4"))
    scale, shift = MaxOptimizer()(w, qtype=qint4, axis=0, group_size=128)
    assert torch.equal(parts["scale"], scale.to(torch.float16))
    assert torch.equal(parts["shift"], shift.to(torch.float16))
    codes = torch.ops.quanto.quantize_affine(w, bits=4, axis=0, group_size=128,
                                             scale=parts["scale"], shift=parts["shift"])
    theirs = WeightQBitsTensor(qint4, 0, 128, w.size(), w.stride(), codes, parts["scale"],
                               parts["shift"])
    assert torch.equal(parts["weight"], theirs._data._data)
    assert torch.equal(unpack_int4(parts["weight"], codes.shape[0]), codes)
    # quanto dequantizes unpacked codes as is (its unpack op would compile a C++ extension)
    theirs._data = codes
    assert torch.equal(ADAPTER.dequantize(parts, spec("int4"), w.shape, torch.float16),
                       theirs.dequantize())


def test_int4_odd_number_of_groups():
    w = gaussian((3, 128))  # 3 groups: the packed tensor holds 2 rows, one nibble unused
    parts, back = round_trip(w, "int4")
    assert parts["weight"].shape == (2, 128)
    assert rel_err(back, w) < BOUNDS["int4"][0] * 1.2


@pytest.mark.parametrize("name", ALL)
def test_runs_on_cpu_as_claimed(name):
    assert hardware_problem(spec(name), torch.device("cpu")) is None


def test_missing_package_gives_clear_message():
    check_missing_package_message(ADAPTER, "int8", "optimum-quanto>=0.2.6", registry, BackendUnavailable)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL)
def test_cuda_path(name):
    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA GPU: run on the GPU machine (bash .ci/gpu_tests)")
    s = spec(name)
    w = heavy_tailed((512, 1024))
    parts = ADAPTER.quantize(w.cuda(), s)
    assert all(type(t) is torch.Tensor and t.is_cuda for t in parts.values())
    back = ADAPTER.dequantize(parts, s, w.shape, torch.float32)
    err = rel_err(back, w.cuda())
    print(f"quanto:{name} on CUDA: relative error {err:.4f}")
    assert err < BOUNDS[name][1] * 1.2  # a larger matrix draws larger Student-t extremes
    cpu_parts = ADAPTER.quantize(w, s)
    assert rel_err(back.cpu(), ADAPTER.dequantize(cpu_parts, s, w.shape, torch.float32)) < 1e-3
    for dtype in (torch.float16, torch.bfloat16):
        for tokens in (1, 7, 300):
            x = torch.randn(tokens, 1024, device="cuda", dtype=dtype)
            bias = torch.randn(512, device="cuda", dtype=dtype)
            y = ADAPTER.linear(x, parts, s, w.shape, bias)
            ref = F.linear(x.float(), back, bias.float())
            assert y.dtype == dtype and rel_err(y, ref) < 1e-2, (dtype, tokens)
