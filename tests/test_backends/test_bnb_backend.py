"""bitsandbytes adapter: accuracy, honest sizes, the plain-tensor contract, and agreement
with bitsandbytes' own modules and dequantization on the same weights."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from quantkit.backends.engine import registry
from quantkit.backends.engine.base import hardware_problem, parts_nbytes
from quantkit.backends.adapters.bnb import BitsAndBytesAdapter
from quantkit.backends.engine.errors import BackendUnavailable
from harness.backend_checks import (check_missing_package_message,
                                    check_plain_parts_with_honest_size, check_round_trip)
from harness.draws import gaussian, heavy_tailed, rel_err

ADAPTER = BitsAndBytesAdapter()
FOUR_BIT = ["nf4", "nf4dq", "fp4", "fp4dq"]
ALL = FOUR_BIT + ["int8"]
# Relative Frobenius error bounds (Gaussian, heavy-tailed); measured about 10 % below.
BOUNDS = {"nf4": (0.10, 0.14), "nf4dq": (0.10, 0.14), "fp4": (0.135, 0.21),
          "fp4dq": (0.135, 0.21), "int8": (0.009, 0.025)}


def spec(name):
    return ADAPTER.formats[name]


def round_trip(w, name, dtype=torch.float32):
    parts = ADAPTER.quantize(w, spec(name))
    return parts, ADAPTER.dequantize(parts, spec(name), w.shape, dtype)


def test_format_ids_are_the_api():
    assert sorted(ADAPTER.formats) == sorted(ALL)
    assert [s.id for s in ADAPTER.formats.values()] == [f"bnb:{n}" for n in ADAPTER.formats]
    assert all(spec(n).keep_final_projection for n in FOUR_BIT)
    assert spec("nf4").bits_per_weight == 4.5
    assert spec("nf4dq").bits_per_weight == pytest.approx(4.127, abs=1e-3)


@pytest.mark.parametrize("dist", ["gaussian", "heavy_tailed"])
@pytest.mark.parametrize("name", ALL)
def test_round_trip_error(name, dist):
    check_round_trip(ADAPTER, name, dist, BOUNDS[name][dist == "heavy_tailed"])


@pytest.mark.parametrize("name", ALL)
def test_parts_are_plain_tensors_with_honest_size(name):
    check_plain_parts_with_honest_size(ADAPTER, name, parts_nbytes)


@pytest.mark.parametrize("name", ALL)
def test_conv_weight_round_trip(name):
    w = heavy_tailed((64, 32, 3, 3))  # width 288: not a multiple of bnb's 64-block
    _, back = round_trip(w, name)
    err = rel_err(back, w)
    print(f"bnb:{name} conv {tuple(w.shape)}: relative error {err:.4f}")
    assert back.shape == w.shape
    assert err < BOUNDS[name][1] * 1.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", FOUR_BIT)
def test_four_bit_linear_matches_dequantize(name, dtype):
    w = gaussian((192, 256))
    parts = ADAPTER.quantize(w, spec(name))
    x = gaussian((3, 5, 256), seed=7).to(dtype) * 50
    bias = gaussian((192,), seed=8).to(dtype)
    y = ADAPTER.linear(x, parts, spec(name), w.shape, bias)
    ref = F.linear(x, ADAPTER.dequantize(parts, spec(name), w.shape, dtype), bias)
    assert y.shape == (3, 5, 192) and y.dtype == dtype
    assert rel_err(y, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_four_bit_linear_unaligned_width():
    w = gaussian((64, 288))  # 288 % 64 != 0: computed as dequantize + F.linear
    parts = ADAPTER.quantize(w, spec("nf4"))
    x = gaussian((4, 288), seed=3)
    ref = F.linear(x, ADAPTER.dequantize(parts, spec("nf4"), w.shape, x.dtype))
    assert rel_err(ADAPTER.linear(x, parts, spec("nf4"), w.shape, None), ref) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_int8_linear_matches_dequantize(dtype):
    """LLM.int8 quantizes the activations too: the product differs from dequantize + F.linear
    by the activations' int8 rounding (about 1 %)."""
    w = gaussian((192, 256))
    parts = ADAPTER.quantize(w, spec("int8"))
    x = torch.randn((2, 9, 256), generator=torch.Generator().manual_seed(4)).to(dtype)
    bias = gaussian((192,), seed=8).to(dtype)
    y = ADAPTER.linear(x, parts, spec("int8"), w.shape, bias)
    ref = F.linear(x.float(), ADAPTER.dequantize(parts, spec("int8"), w.shape, torch.float32),
                   bias.float())
    err = rel_err(y, ref)
    print(f"bnb:int8 linear {dtype}: relative difference to dequantize+F.linear {err:.4f}")
    assert y.shape == (2, 9, 192) and y.dtype == dtype
    assert err < 0.015


def test_int8_outlier_columns_are_kept_in_high_precision():
    torch.manual_seed(0)
    w = gaussian((128, 256))
    parts = ADAPTER.quantize(w, spec("int8"))
    x = torch.randn(16, 256)
    x[:, [3, 77, 200]] *= 40  # columns far above the 6.0 threshold
    ref = F.linear(x, ADAPTER.dequantize(parts, spec("int8"), w.shape, torch.float32))
    ours = rel_err(ADAPTER.linear(x, parts, spec("int8"), w.shape, None), ref)
    # the same product without the decomposition (threshold 0): outliers blow up the row scales
    ops = torch.ops.bitsandbytes
    ca, sca, _ = ops.int8_vectorwise_quant(x.to(torch.float16), 0.0)
    plain = ops.int8_scaled_mm(ca, parts["weight"], sca, parts["row_absmax"], dtype=torch.float32)
    pure_int8 = rel_err(plain, ref)
    print(f"bnb:int8 with outliers: {ours:.4f} (pure int8 would give {pure_int8:.4f})")
    assert ours < 0.015 and pure_int8 > 3 * ours


def test_int8_matches_bnb_linear8bitlt():
    import bitsandbytes as bnb

    w, b = gaussian((96, 128)), gaussian((96,), seed=2)
    lin = bnb.nn.Linear8bitLt(128, 96, bias=True, has_fp16_weights=False, threshold=6.0)
    lin.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    lin.bias = torch.nn.Parameter(b.clone(), requires_grad=False)
    lin = lin.to("cpu").eval()
    parts = ADAPTER.quantize(w, spec("int8"))
    assert torch.equal(parts["weight"], lin.weight.data)
    assert torch.equal(parts["row_absmax"], lin.weight.SCB)
    x = torch.randn(6, 128, dtype=torch.float16)
    x[:, 5] = 9.0  # one outlier column
    with torch.no_grad():
        expected = lin(x)
    ours = ADAPTER.linear(x, parts, spec("int8"), w.shape, b.to(torch.float16))
    assert torch.allclose(ours, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", FOUR_BIT)
def test_four_bit_matches_bnb_own_dequantization_and_module(name):
    """Our parts and rebuilt QuantState against bnb's Params4bit/Linear4bit on the same weight."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    s = spec(name)
    w, b = heavy_tailed((128, 256)), gaussian((128,), seed=2)
    lin = bnb.nn.Linear4bit(256, 128, bias=True, compute_dtype=torch.float32,
                            compress_statistics=s.double_quant, quant_type=s.quant_type)
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=s.quant_type,
                                   compress_statistics=s.double_quant, blocksize=64)
    lin.bias = torch.nn.Parameter(b.clone(), requires_grad=False)
    lin = lin.to("cpu").eval()
    qs = lin.weight.quant_state
    parts = ADAPTER.quantize(w, s)
    assert torch.equal(parts["weight"], lin.weight.data)
    assert torch.equal(parts["absmax"], qs.absmax)
    if s.double_quant:
        assert torch.equal(parts["nested_absmax"], qs.state2.absmax)
        assert torch.equal(parts["offset"], qs.offset.reshape(()))
    theirs = bf.dequantize_4bit(lin.weight.data, qs)
    assert torch.equal(ADAPTER.dequantize(parts, s, w.shape, torch.float32), theirs)
    x = gaussian((4, 256), seed=5) * 50
    with torch.no_grad():
        expected = lin(x)  # on AVX512-BF16 CPUs bnb repacks and computes in bf16
    assert rel_err(ADAPTER.linear(x, parts, s, w.shape, b), expected) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ALL)
def test_dequantize_to_half_dtypes(name, dtype):
    w = gaussian((64, 128))
    parts, full = round_trip(w, name)
    half = ADAPTER.dequantize(parts, spec(name), w.shape, dtype)
    assert half.dtype == dtype and rel_err(half, full) < 5e-3


@pytest.mark.parametrize("name", ALL)
def test_runs_on_cpu_as_claimed(name):
    assert hardware_problem(spec(name), torch.device("cpu")) is None


def test_missing_package_gives_clear_message():
    check_missing_package_message(ADAPTER, "nf4", "bitsandbytes>=0.45.0", registry, BackendUnavailable)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL)
def test_cuda_path(name):
    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA GPU: run on the GPU machine (bash .ci/gpu_tests)")
    s = spec(name)
    w = heavy_tailed((512, 1024)).cuda()
    parts = ADAPTER.quantize(w, s)
    assert all(type(t) is torch.Tensor and t.is_cuda for t in parts.values())
    assert parts_nbytes(parts) * 8 / w.numel() == pytest.approx(s.bits_per_weight, rel=0.02)
    back = ADAPTER.dequantize(parts, s, w.shape, torch.float32)
    err = rel_err(back, w)
    print(f"bnb:{name} on CUDA: relative error {err:.4f}")
    assert err < BOUNDS[name][1] * 1.2  # a larger matrix draws larger Student-t extremes
    # quantized on the CPU, computed on the GPU: the same weights
    cpu_parts = ADAPTER.quantize(w.cpu(), s)
    moved = {k: v.cuda() for k, v in cpu_parts.items()}
    from_cpu = ADAPTER.dequantize(moved, s, w.shape, torch.float32)
    assert rel_err(from_cpu.cpu(), ADAPTER.dequantize(cpu_parts, s, w.shape, torch.float32)) < 1e-6
    assert rel_err(from_cpu, back) < 0.05
    for dtype in (torch.float16, torch.bfloat16):
        for tokens in (1, 7, 300):  # gemv, small and large batches take different kernels
            x = torch.randn(tokens, 1024, device="cuda", dtype=dtype)
            bias = torch.randn(512, device="cuda", dtype=dtype)
            y = ADAPTER.linear(x, parts, s, w.shape, bias)
            ref = F.linear(x.float(), back, bias.float())
            tol = 0.015 if name == "int8" else 0.01
            assert y.dtype == dtype and rel_err(y, ref) < tol, (dtype, tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL)
def test_cuda_matches_bnb_modules(name):
    """bnb's own Linear4bit / Linear8bitLt on the GPU against our parts and linear()."""
    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA GPU: run on the GPU machine (bash .ci/gpu_tests)")
    import bitsandbytes as bnb

    s = spec(name)
    w, b = heavy_tailed((256, 512)), gaussian((256,), seed=2)
    if name == "int8":
        lin = bnb.nn.Linear8bitLt(512, 256, bias=True, has_fp16_weights=False, threshold=6.0)
        lin.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        lin = bnb.nn.Linear4bit(512, 256, bias=True, compute_dtype=torch.float16,
                                compress_statistics=s.double_quant, quant_type=s.quant_type)
        lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=s.quant_type,
                                       compress_statistics=s.double_quant, blocksize=64)
    lin.bias = torch.nn.Parameter(b.clone().half(), requires_grad=False)
    lin = lin.cuda().eval()
    parts = ADAPTER.quantize(w.cuda(), s)
    assert torch.equal(parts["weight"], lin.weight.data)
    x = torch.randn(5, 512, device="cuda", dtype=torch.float16)
    x[:, 9] = 8.0  # an outlier column for LLM.int8
    with torch.no_grad():
        expected = lin(x)
    ours = ADAPTER.linear(x, parts, s, w.shape, lin.bias)
    assert rel_err(ours, expected) < 1e-3
