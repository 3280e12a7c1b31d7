"""GGUF dequantization: our torch decoders equal gguf-py's independent numpy decoders
bit for bit, on random bytes, on our quantizer's bytes and on gguf-py's own bytes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import pack_module
from harness.tolerances import rounding_bound

import gguf  # a test dependency (.ci/requirements-dev.txt): missing means failing, not skipping
from gguf.quants import dequantize as np_dequantize  # noqa: E402
from gguf.quants import quantize as np_quantize  # noqa: E402

dq = pack_module("backends.gguf.dequant")
gq = pack_module("backends.gguf.quantize")
errors = pack_module("backends.engine.errors")

TYPES = list(dq.DEQUANTIZERS)
QUANTIZABLE = list(gq.QUANTIZERS)  # the IQ types are read only
LEGACY = ["Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1"]


def reference(raw: torch.Tensor, name: str) -> torch.Tensor:
    return torch.from_numpy(np_dequantize(raw.numpy(), gguf.GGMLQuantizationType[name]))


@pytest.mark.parametrize("name", TYPES, ids=TYPES)
def test_random_bytes_decode_like_gguf_py(name):
    """Every bit pattern, not just ones our quantizer makes; fp16 scales may be inf/nan
    (assert_array_equal counts nan == nan).
    Shown able to fail: dequant_q4_0 subtracting 7 instead of 8 -> Q4_0 differs from gguf-py."""
    block_len, type_size = dq.BLOCK_SIZES[name]
    raw = torch.randint(0, 256, (6, 4 * type_size), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(3))
    ours = dq.dequantize(raw, name, (6, 4 * block_len))
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(ours.numpy(), reference(raw, name).numpy())


@pytest.mark.parametrize("name", QUANTIZABLE, ids=QUANTIZABLE)
def test_our_quantizer_bytes_decode_like_gguf_py(name):
    """Shown able to fail: _k_scales_mins masking the scales' top bits with 0x10 instead of
    0x30 -> Q5_K (and Q4_K, same helper) differ from gguf-py."""
    w = torch.randn(16, 1024, generator=torch.Generator().manual_seed(1)) * 0.02
    raw = gq.quantize(w, name)
    assert torch.equal(dq.dequantize(raw, name, w.shape), reference(raw, name))


@pytest.mark.parametrize("name", LEGACY, ids=LEGACY)
def test_gguf_py_quantizer_bytes_decode_like_gguf_py(name):
    """Bytes from gguf-py's own quantizer, decoded by both.
    Shown able to fail: dequant_q5_1 subtracting the min instead of adding it -> Q5_1 differs."""
    w = np.random.default_rng(2).standard_normal((16, 512)).astype(np.float32)
    raw = np_quantize(w, gguf.GGMLQuantizationType[name])
    ours = dq.dequantize(torch.from_numpy(raw), name, w.shape)
    assert torch.equal(ours, reference(torch.from_numpy(raw), name))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q3_K"], ids=["Q8_0", "Q4_K", "Q3_K"])
def test_low_precision_output_is_gguf_py_result_rounded(name, dtype):
    """fp16/bf16 output equals gguf-py's float32 decode rounded once (no double rounding).
    Shown able to fail: dequant_q8_0 multiplying q.to(dtype) * d.to(dtype) -> the bf16
    results differ in the last bit (fp16 ones happen to match)."""
    w = torch.randn(4, 512) * 0.02
    raw = gq.quantize(w, name)
    assert torch.equal(dq.dequantize(raw, name, w.shape, dtype),
                       reference(raw, name).reshape(w.shape).to(dtype))


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"], ids=["F32", "F16", "BF16"])
def test_float_types_pass_through(name):
    """Shown able to fail: dequantize() viewing float bytes as FLOAT_TYPES["F16"] whatever the
    type -> F32 bytes raise MalformedFile (twice as many values)."""
    t = torch.randn(3, 4, 5).to(dq.FLOAT_TYPES[name])
    as_bytes = t.reshape(-1).view(torch.uint8).reshape(3, -1)
    assert torch.equal(dq.dequantize(as_bytes, name, t.shape, t.dtype), t)
    assert torch.equal(dq.dequantize(t, name, (12, 5), torch.float32), t.float().reshape(12, 5))


def test_bad_inputs_raise_clear_errors():
    """Shown able to fail: dequantize() without its raw.dtype != torch.uint8 check -> the
    float input raises NotImplementedError, not MalformedFile."""
    raw = gq.quantize(torch.randn(2, 256), "Q4_K")
    with pytest.raises(errors.FormatUnsupported, match="IQ2_XS"):
        dq.dequantize(raw, "IQ2_XS", (2, 256))
    with pytest.raises(errors.MalformedFile, match="does not match"):
        dq.dequantize(raw, "Q4_K", (2, 512))
    with pytest.raises(errors.MalformedFile, match="uint8"):
        dq.dequantize(raw.float(), "Q4_K", (2, 256))


@pytest.mark.parametrize("name", TYPES, ids=TYPES)
def test_traces_as_one_graph(name):
    """No graph breaks, no .item(): fullgraph compile (aot_eager: no code generation).
    Shown able to fail: dequant_q8_0 branching on `if d.abs().max() > 1e30` -> Q8_0 fails
    to compile with fullgraph=True (data-dependent control flow)."""
    torch._dynamo.reset()
    block_len, type_size = dq.BLOCK_SIZES[name]
    raw = (gq.quantize(torch.randn(4, 512), name) if name in QUANTIZABLE else
           torch.randint(0, 256, (4, 512 // block_len * type_size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(4)))

    def fn(r):
        return dq.dequantize(r, name, (4, 512), torch.float16)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(raw), fn(raw), rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
def test_cuda_and_inductor_match_cpu():
    """Triton decoder and inductor within float32 rounding of the CPU torch decoders (which
    the tests above tie to gguf-py bit for bit).
    Shown able to fail (reasoned, GPU only): triton_gguf._k_scale_min shifting the upper
    sub-blocks' top scale bits by << 5 instead of << 4 -> Q5_K and Q4_K on CUDA differ far
    beyond rtol 3.6e-7 (rounding_bound(float32, 9))."""
    if not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA GPU: run it on the GPU machine (bash .ci/gpu_tests)")
    w = torch.randn(64, 1024) * 0.02
    # a value is d x sub-scale x code minus the block's offset: at most 3 float32 roundings
    # on each side, in either order (and, where the offset cancels the value, that much of
    # the block's largest value)
    bound = rounding_bound(torch.float32, 9)
    for name in QUANTIZABLE:
        raw = gq.quantize(w, name)
        cpu = dq.dequantize(raw, name, w.shape)
        cuda = dq.dequantize(raw.cuda(), name, w.shape)  # the Triton decoder
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=bound, atol=bound * cpu.abs().max().item(), msg=name)
        torch._dynamo.reset()
        fn = torch.compile(lambda r: dq.dequantize(r, name, w.shape), fullgraph=True)
        torch.testing.assert_close(fn(raw.cuda()).cpu(), cpu, rtol=bound, atol=bound * cpu.abs().max().item(), msg=name)
