"""torchao adapter: values equal torchao's own primitives; CUDA-only formats on a GPU."""
from __future__ import annotations

import pytest
import torch

from conftest import pack_module
from harness.tiny_models import heavy_tailed

registry = pack_module("backends.engine.registry")
base = pack_module("backends.engine.base")


def test_int8_values_equal_torchaos_affine_quantization():
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine
    adapter, spec = registry.get_format("torchao:int8wo")
    w = heavy_tailed((256, 512), 5)
    ours = adapter.quantize(w, spec)
    block = (1, 512)
    scale, zero = choose_qparams_affine(w, MappingType.SYMMETRIC, block, torch.int8, quant_min=-127,
                                        quant_max=127, eps=1e-12, scale_dtype=torch.float32)
    theirs = quantize_affine(w, block, scale, zero, torch.int8, quant_min=-127, quant_max=127)
    assert torch.allclose(ours["scale"], scale.reshape(-1))
    assert (ours["weight"].int() - theirs.int()).abs().max() <= 1  # rounding ties at most
    assert (ours["weight"] != theirs).float().mean() < 1e-3


@pytest.mark.parametrize("name", ["fp8dq", "int4wo"])
def test_cuda_only_formats_say_so_on_cpu(name):
    spec = registry.get_format(f"torchao:{name}")[1]
    assert "NVIDIA GPU" in base.hardware_problem(spec, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("name,bound", [("fp8dq", 0.08), ("int4wo", 0.3), ("int8dq", 0.06), ("int8wo", 0.05)])
def test_cuda_formats_linear(name, bound):
    if not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA GPU: run it on the GPU machine (bash .ci/gpu_tests)")
    adapter, spec = registry.get_format(f"torchao:{name}")
    w = heavy_tailed((1024, 2048), 9).cuda()
    parts = adapter.quantize(w, spec)
    x = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16)
    ref = (x.float() @ w.t())
    y = adapter.linear(x, parts, spec, w.shape, None).float()
    err = ((y - ref).norm() / ref.norm()).item()
    print(f"torchao:{name} CUDA linear error {err:.4f}")
    assert err < bound
    back = adapter.dequantize(parts, spec, w.shape, torch.float32)
    assert ((back - w).norm() / w.norm()).item() < bound
