"""The Triton GGUF decoder (backends/kernels/triton_gguf.py) against gguf-py's numpy decoders.

On the CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, in a subprocess:
the variable must be set before the kernel is defined); on the GPU machine it runs compiled.
Random bytes cover every bit pattern, not only those our quantizer writes. How to see these
fail: in `_k_scale_min` read the high scale bits from `b` instead of `a` (Q4_K/Q5_K go red),
or drop the `- 32` of Q6_K.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import pack_module

import gguf
from gguf.quants import dequantize as np_dequantize

dq = pack_module("backends.gguf.dequant")
fast = pack_module("backends.kernels.fast_linear")
REPO = Path(__file__).resolve().parents[2]

_INTERPRETED = r"""
import importlib, json, sys, types
import numpy as np, torch
import gguf
from gguf.quants import dequantize as ref
pack = types.ModuleType("qk_pack"); pack.__path__ = [sys.argv[1]]; sys.modules["qk_pack"] = pack
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
    # the read-only IQ4 types decode with torch ops (no GPU run has checked a kernel for them)
    assert set(pack_module("backends.gguf.quantize").QUANTIZERS) == set(KERNEL_TYPES)
    assert set(dq.DEQUANTIZERS) - set(KERNEL_TYPES) == {"IQ4_NL", "IQ4_XS"}
    kernels_types = set(KERNEL_TYPES)
    for name in kernels_types:
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == dq.BLOCK_SIZES[name]


def test_interpreted_kernel_decodes_like_gguf_py():
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
    # fused multiply-adds on the GPU may change the last float32 bit, nothing more
    torch.testing.assert_close(ours[finite], want[finite], rtol=2e-7, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q6_K", "Q2_K"])
def test_gpu_low_precision_output_is_the_float32_result_rounded(name, dtype):
    _cuda()
    gq = pack_module("backends.gguf.quantize")
    w = torch.randn(300, 1024, generator=torch.Generator().manual_seed(2)) * 0.02
    raw = gq.quantize(w, name).cuda()
    exact = torch.from_numpy(np_dequantize(raw.cpu().numpy(), gguf.GGMLQuantizationType[name]))
    ours = dq.dequantize(raw, name, w.shape, dtype).cpu()
    # the float32 value rounded to the output type: within one unit in its last place
    ulp = torch.finfo(dtype).eps * exact.abs().clamp(min=torch.finfo(dtype).tiny)
    assert ((ours.float() - exact).abs() <= ulp).all()
