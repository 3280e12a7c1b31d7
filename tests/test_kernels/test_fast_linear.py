"""8-bit linear paths on the CPU: which kernel runs, and that each computes what it claims.

Expected values are float64 products of the same quantized operands, computed here from
first principles (scale = row absmax / 127, round half to even), not by the code under test.
"""
from __future__ import annotations

import pytest
import torch

from conftest import pack_module
from harness.draws import gaussian, heavy_tailed, rel_err
from harness.int8_reference import int8_rows
from harness.tolerances import TIE_FRACTION, rounding_bound

fast = pack_module("backends.kernels.fast_linear")
registry = pack_module("backends.engine.registry")



def _operands(m=96, k=512, n=192, seed=3):
    x = gaussian((m, k), seed) * 50  # activations of order 1
    w = heavy_tailed((n, k), seed + 1)
    q64, s64 = int8_rows(w.double())
    bias = gaussian((n,), seed + 2)
    return x, w, q64.to(torch.int8), s64.float(), bias


def test_activation_rows_quantize_like_the_float64_formula():
    """Shown able to fail: INT8_MAX = 128.0 in fast_linear.py -> the scales differ from
    absmax / 127."""
    x = heavy_tailed((64, 300), 7) * 40
    q, s = fast.quantize_rows_reference(x, torch.int8, fast.INT8_MAX)
    q64, s64 = int8_rows(x.double())
    # one float32 division each: within one rounding of the float64 formula
    assert torch.allclose(s.squeeze(1).double(), s64, rtol=rounding_bound(torch.float32), atol=0)
    flips = (q.double() != q64).float().mean()
    assert flips < TIE_FRACTION and (q.double() - q64).abs().max() <= 1, flips


@pytest.mark.parametrize("rows", [96, 1100])  # 1100: three row blocks, the last one ragged
def test_cpu_w8a8_equals_the_exact_product_of_its_quantized_operands(rows):
    """Shown able to fail: _cpu_int_mm quantizing x2[0:rows] for every row block -> the
    1100-row case (three blocks) differs; 96 rows (one block) still pass."""
    x, w, q, s, bias = _operands(m=rows)
    fast.KERNELS.clear()
    y = fast.int8_linear(x, q, s, bias, dynamic=True)
    assert fast.KERNELS == {"cpu:int_mm": 1}
    # the activations as quantized (checked against float64 in the test above), then the
    # product in float64
    xq, xs = fast.quantize_rows_reference(x, torch.int8, fast.INT8_MAX)
    exact = (xq.double() * xs.double()) @ (q.double() * s.double()[:, None]).t() + bias.double()
    # the int32 sums are exact: only the epilogue rounds (two scales, the bias, the float32 output)
    assert rel_err(y.double(), exact) < rounding_bound(torch.float32, 4)


def test_cpu_weight_only_keeps_activations_exact():
    """Shown able to fail: _dequant_matmul dequantizing to bfloat16 -> relative error 1.6e-3."""
    x, w, q, s, bias = _operands()
    fast.KERNELS.clear()
    y = fast.int8_linear(x, q, s, bias, dynamic=False)
    assert fast.KERNELS == {"dequant+matmul": 1}
    exact = x.double() @ (q.double() * s.double()[:, None]).t() + bias.double()
    assert rel_err(y.double(), exact) < rounding_bound(torch.float32, x.shape[1])


def test_w8a8_error_band_against_the_float_layer():
    """Per-channel int8 weights plus per-row int8 activations on Gaussian data: the output
    error is set by two roundings of step absmax/127 (~3.5 sigma/127, uniform noise). The
    band is narrow enough that a weight-only path (too small) or a wrong scale (too big)
    falls outside it.
    Shown able to fail: int8_linear ignoring `dynamic` on the CPU (`if False:` for the
    _cpu_int_mm branch) -> e_dq 0.0079 < 1.2 x predicted 0.0082."""
    x = gaussian((256, 1024), 11) * 50
    w = gaussian((512, 1024), 12)
    q64, s64 = int8_rows(w.double())
    float_out = x.double() @ w.double().t()
    y_dq = fast.int8_linear(x, q64.to(torch.int8), s64.float(), None, dynamic=True)
    y_wo = fast.int8_linear(x, q64.to(torch.int8), s64.float(), None, dynamic=False)
    e_dq, e_wo = rel_err(y_dq.double(), float_out), rel_err(y_wo.double(), float_out)
    predicted_one = 3.6 / 127 / 12 ** 0.5  # one rounding, relative
    assert 0.6 * predicted_one < e_wo < 1.2 * predicted_one
    assert 1.2 * predicted_one < e_dq < 1.7 * predicted_one


def test_fp8_off_gpu_computes_weight_only():
    """Shown able to fail: fp8_linear without its fp8_matmul_supported check -> the
    scaled_mm:fp8 path runs instead of dequant+matmul."""
    adapter, spec = registry.get_format("torchao:fp8wo")
    w = heavy_tailed((64, 128), 4)
    parts = adapter.quantize(w, spec)
    x = gaussian((8, 128), 5)
    fast.KERNELS.clear()
    y = fast.fp8_linear(x, parts["weight"], parts["scale"], None, dynamic=True)
    assert fast.KERNELS == {"dequant+matmul": 1}
    exact = x.double() @ (parts["weight"].double() * parts["scale"].double()[:, None]).t()
    assert rel_err(y.double(), exact) < rounding_bound(torch.float32, x.shape[1])


@pytest.mark.parametrize("fmt", ["torchao:int8wo", "torchao:int8dq"])
def test_quantized_model_compiles_whole_and_matches_eager(fmt):
    """Shown able to fail: int8_linear branching on `bool((x2 != x2).any())` -> 9 graph
    breaks (Tensor.item()), not 0."""
    quantize = pack_module("backends.engine.quantize")
    recipes = pack_module("backends.engine.recipes")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    quantize.quantize_tree(model, fmt, recipes.get_recipe("generic"), target="test")
    x = torch.randn(32, 64)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < rounding_bound(torch.float32, 256)  # the widest sum


def test_a_triton_that_cannot_build_falls_back_once_with_a_warning(monkeypatch, caplog):
    """No C compiler (Triton builds a launcher with one) must not break a run: the layer
    computes through plain torch, Triton is switched off, and the log says why.
    Shown able to fail: triton_failed without `_TRITON = False` -> fast._TRITON stays True."""
    class Broken:
        def quantize_rows(self, *a, **k):
            raise RuntimeError("Failed to find C compiler. Please specify via CC")
        int8_weight_matmul = quantize_rows

    monkeypatch.setattr(fast, "_kernels", lambda: Broken())
    monkeypatch.setattr(fast, "_TRITON", True)
    x, w, q, s, bias = _operands()
    fast.KERNELS.clear()
    with caplog.at_level("WARNING", logger="quantkit"):
        y = fast._w8a8_eager(x, q, s, bias)
    assert fast._TRITON is False
    assert fast.KERNELS == {"dequant+matmul": 1}
    assert "C compiler" in caplog.text and "plain torch" in caplog.text
    exact = x.double() @ (q.double() * s.double()[:, None]).t() + bias.double()
    assert rel_err(y.double(), exact) < rounding_bound(torch.float32, x.shape[1])


def test_out_of_memory_in_a_kernel_is_not_taken_for_a_missing_triton(monkeypatch):
    """Shown able to fail: triton_failed without its OutOfMemoryError re-raise -> DID NOT
    RAISE OutOfMemoryError."""
    class OutOfMemory:
        def int8_weight_matmul(self, *a, **k):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(fast, "_kernels", lambda: OutOfMemory())
    monkeypatch.setattr(fast, "_TRITON", True)
    x, w, q, s, bias = _operands()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fast._w8a16_eager(x, q, s, bias)
    assert fast._TRITON is True
