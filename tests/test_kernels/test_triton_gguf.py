"""The Triton GGUF decoder (backends/kernels/triton_gguf.py) against gguf-py's numpy decoders.

On the CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, in a subprocess:
the variable must be set before the kernel is defined); on the GPU machine it runs compiled.
Random bytes cover every bit pattern, not only those our quantizer writes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import pack_module
from harness.tolerances import rounding_bound

import gguf
from gguf.quants import dequantize as np_dequantize

dq = pack_module("backends.gguf.dequant")
fast = pack_module("backends.kernels.fast_linear")
REPO = Path(__file__).resolve().parents[2]

_INTERPRETED = r"""
import importlib, json, sys
import numpy as np, torch
import gguf
from gguf.quants import dequantize as ref
sys.path.insert(0, sys.argv[1] + "/tests")
from harness.comfy_inprocess import import_pack
import_pack("qk_pack")
kernels = importlib.import_module("qk_pack.backends.kernels.triton_gguf")
report = {}
for name, (_, block_len, type_size) in kernels.TYPES.items():
    raw = torch.randint(0, 256, (3 * type_size,), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(5))
    ours = kernels.decode(raw, name, 3 * block_len, torch.float32).numpy()
    want = ref(raw.numpy(), gguf.GGMLQuantizationType[name]).reshape(-1)
    same = np.array_equal(ours, want, equal_nan=True)
    report[name] = "ok" if same else f"{int((ours != want).sum())} of {ours.size} differ"
print(json.dumps(report))
"""


KERNEL_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"]


def test_every_type_quantkit_makes_has_a_kernel():
    """The kernel's own type table (triton_gguf.TYPES) covers every type we quantize to, with
    gguf-py's block sizes; the read-only IQ4 types decode with torch ops.
    Shown able to fail: QUANTIZERS gaining "IQ4_NL" (no kernel) -> extra item 'IQ4_NL'.
    (triton_gguf.TYPES derives from backends/gguf/types.py, which test_gguf/test_types.py checks
    against gguf-py.)"""
    kernels = pack_module("backends.kernels.triton_gguf")
    assert set(kernels.TYPES) == set(KERNEL_TYPES)
    assert set(pack_module("backends.gguf.quantize").QUANTIZERS) == set(KERNEL_TYPES)
    assert set(dq.DEQUANTIZERS) - set(KERNEL_TYPES) == {"IQ4_NL", "IQ4_XS"}
    for name, (_, block_len, type_size) in kernels.TYPES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == (block_len, type_size)


def test_interpreted_kernel_decodes_like_gguf_py():
    """Shown able to fail: _k_scale_min reading the high scale bits from `b` instead of `a`
    -> Q4_K and Q5_K differ from gguf-py; Q6_K's `- 32` dropped -> Q6_K differs."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _INTERPRETED, str(REPO)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {name: "ok" for name in KERNEL_TYPES}


def _cuda():
    if not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA GPU: run it on the GPU machine (bash .ci/gpu_matrix.sh)")


@pytest.mark.gpu
@pytest.mark.parametrize("name", KERNEL_TYPES)
def test_gpu_kernel_decodes_random_bytes_like_gguf_py(name):
    """The compiled kernel within float32 rounding of gguf-py: d x sub-scale x code minus
    the offset, 3 roundings (rounding_bound(float32, 3) = 2.1e-7; fused multiply-adds skip some).
    Shown able to fail (reasoned, GPU only): the Q6_K `- 32` dropped from _decode_elements
    -> every Q6_K value is off by 32 * scale, far beyond rtol 2.1e-7 (the interpreted test
    fails on the same mutation); decode_gguf_blocks not counting the launch -> KERNELS is 0."""
    _cuda()
    block_len, type_size = dq.BLOCK_SIZES[name]
    raw = torch.randint(0, 256, (37, 3 * type_size), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(7))
    want = torch.from_numpy(np_dequantize(raw.numpy(), gguf.GGMLQuantizationType[name]))
    fast.KERNELS.clear()
    ours = dq.dequantize(raw.cuda(), name, (37, 3 * block_len)).cpu()
    assert fast.KERNELS["triton:gguf-decode"] == 1
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(ours), finite)
    torch.testing.assert_close(ours[finite], want[finite], rtol=rounding_bound(torch.float32, 3), atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q6_K", "Q2_K"])
def test_gpu_low_precision_output_is_the_float32_result_rounded(name, dtype):
    """bf16/fp16 output is gguf-py's float32 result correctly rounded: within half a unit in
    the last place, plus the 2e-7 the kernel's float32 value may differ by (fused multiply-adds).
    Shown able to fail (reasoned, GPU only): _decode_elements storing with
    fp_downcast_rounding="rtz" (truncation) -> about half the values err by more than half
    an ulp (the former one-ulp bound let truncation pass)."""
    _cuda()
    gq = pack_module("backends.gguf.quantize")
    w = torch.randn(300, 1024, generator=torch.Generator().manual_seed(2)) * 0.02
    raw = gq.quantize(w, name).cuda()
    exact = torch.from_numpy(np_dequantize(raw.cpu().numpy(), gguf.GGMLQuantizationType[name]))
    ours = dq.dequantize(raw, name, w.shape, dtype).cpu()
    # eps * |x| is at least one ulp of x (subnormals: eps * tiny is their ulp)
    ulp = torch.finfo(dtype).eps * exact.abs().clamp(min=torch.finfo(dtype).tiny)
    assert ((ours.float() - exact).abs() <= ulp / 2 + 2e-7 * exact.abs()).all()
