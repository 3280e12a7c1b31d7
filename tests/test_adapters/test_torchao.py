"""torchao adapter: values equal torchao's own primitives; CUDA-only formats on a GPU."""
from __future__ import annotations

import pytest
import torch

from conftest import pack_module
from harness.draws import gaussian, rel_err
from harness.tolerances import TIE_FRACTION, activation_error, product_bound, rounding_bound, weight_error_band
from harness.tiny_models import heavy_tailed

registry = pack_module("backends.engine.registry")
base = pack_module("backends.engine.base")


def test_int8_values_equal_torchaos_affine_quantization():
    """Shown able to fail: / 127.0 -> / 126.0 in torchao.py's _Int8Rows.quantize -> the scales
    differ from choose_qparams_affine's (allclose fails)."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine
    adapter, spec = registry.get_format("torchao:int8wo")
    w = heavy_tailed((256, 512), 5)
    ours = adapter.quantize(w, spec)
    block = (1, 512)
    scale, zero = choose_qparams_affine(w, MappingType.SYMMETRIC, block, torch.int8, quant_min=-127,
                                        quant_max=127, eps=1e-12, scale_dtype=torch.float32)
    theirs = quantize_affine(w, block, scale, zero, torch.int8, quant_min=-127, quant_max=127)
    # one division each: at most one rounding apart
    assert torch.allclose(ours["scale"], scale.reshape(-1), rtol=rounding_bound(torch.float32), atol=0)
    assert (ours["weight"].int() - theirs.int()).abs().max() <= 1  # rounding ties at most
    assert (ours["weight"] != theirs).float().mean() < TIE_FRACTION


@pytest.mark.parametrize("call", ["quantize", "dequantize", "decode_plan", "linear"])
def test_a_format_the_adapter_lacks_is_the_registrys_unknown_format_error(call):
    """A spec naming a torchao format that does not exist gets the registry's one error,
    naming the formats torchao offers (it was a bare KeyError).
    Shown able to fail: the require_format line removed from torchao.py's _scheme ->
    KeyError: 'int3wo' escapes pytest.raises(UnknownFormat)."""
    import dataclasses
    errors = pack_module("backends.engine.errors")
    adapter, real = registry.get_format("torchao:int8wo")
    spec = dataclasses.replace(real, name="int3wo")
    w = torch.randn(8, 16)
    args = {"quantize": (w, spec), "dequantize": ({}, spec, w.shape, torch.float32),
            "decode_plan": (spec, w.shape), "linear": (torch.randn(2, 16), {}, spec, w.shape, None)}[call]
    with pytest.raises(errors.UnknownFormat, match=r"no format 'int3wo'.*torchao:int8wo.*torchao:int4wo"):
        getattr(adapter, call)(*args)


def test_only_int4_needs_the_torchao_package(monkeypatch):
    """The 8-bit formats are torchao's schemes written in torch: with torchao not installed
    they quantize and compute; int4wo (torchao's quantizer) says what to install.
    Shown able to fail: needs_package=False dropped from torchao.py's int8dq row ->
    BackendUnavailable 'needs ... torchao' for int8dq; the `spec` argument dropped from
    check_usable's missing_package call in engine/registry.py -> the same for every format."""
    errors = pack_module("backends.engine.errors")
    adapter = registry.get_adapter("torchao")
    monkeypatch.setattr(adapter, "package", "torchao_not_installed_xyz")
    monkeypatch.setattr(registry, "_IMPORT_CACHE", {})
    w = gaussian((64, 128), 0)
    x = torch.randn((4, 128), generator=torch.Generator().manual_seed(1))
    for name in ("int8wo", "int8dq", "fp8wo"):
        spec = registry.check_usable(adapter, name, "cpu")
        y = adapter.linear(x, adapter.quantize(w, spec), spec, w.shape, None)
        # it computes, inside its band (fidelity: the band tests)
        top = product_bound(weight_error_band(spec.id, spec.bits_per_weight)[1], y.numel())
        assert rel_err(y, x @ w.t()) < top + activation_error(spec.id), name
    with pytest.raises(errors.BackendUnavailable, match=r"pip install torchao>=0\.10\.0"):
        registry.check_usable(adapter, "int4wo", "cpu")


@pytest.mark.parametrize("name", ["fp8dq", "int4wo"])
def test_cuda_only_formats_say_so_on_cpu(name):
    """Shown able to fail: needs_cuda=True dropped from torchao.py's fp8dq entry ->
    hardware_problem returns None on the CPU (TypeError: argument of type 'NoneType')."""
    spec = registry.get_format(f"torchao:{name}")[1]
    assert "NVIDIA GPU" in base.hardware_problem(spec, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fp8dq", "int4wo", "int8dq", "int8wo"])
def test_cuda_formats_linear(name):
    """Round trip and product on the GPU inside the format's band (harness/tolerances.py), for
    Gaussian and heavy-tailed weights, against the float weights.
    Shown able to fail (run on an H200): "scale": scale * 1.03 in torchao.py's _quantize_int8
    -> int8wo and int8dq Gaussian weight 0.031 > 0.0125 (the old bounds 0.05/0.06 passed it);
    "scale": scale * 1.05 for fp8 -> 0.057 > 0.036 (old 0.08 passed it); int4 scales in
    scales_and_zeros * 1.15 -> 0.194 > 0.168; quantizing int4wo with 3 bits -> 2.99."""
    if not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA GPU: run it on the GPU machine (bash .ci/gpu_tests)")
    adapter, spec = registry.get_format(f"torchao:{name}")
    x = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16,
                    generator=torch.Generator("cuda").manual_seed(0))
    for heavy, w in ((False, gaussian((1024, 2048), seed=9)), (True, heavy_tailed((1024, 2048), 9))):
        w = w.cuda()
        low, high = weight_error_band(spec.id, spec.bits_per_weight, heavy)
        if heavy and name.startswith("int8"):
            # a row's absmax of Student-t(3) values grows as width^(1/3): the heavy band holds
            # for rows up to 1024 wide (test_contract.py), these are 2048 wide
            high *= (2048 / 1024) ** (1 / 3)
        parts = adapter.quantize(w, spec)
        back_err = rel_err(adapter.dequantize(parts, spec, w.shape, torch.float32), w)
        err = rel_err(adapter.linear(x, parts, spec, w.shape, None), x.double() @ w.double().t())
        # random inputs carry the weight error into the output one to one (product_bound),
        # plus the 8-bit activations and the bf16 output
        slack = activation_error(spec.id) + rounding_bound(torch.bfloat16)
        top = product_bound(high, 64 * 1024) + slack
        bottom = low * (2 - product_bound(1.0, 64 * 1024))  # the same spread below
        print(f"torchao:{name} {'heavy' if heavy else 'gaussian'}: weight {back_err:.4f} (band "
              f"{low:.4f}-{high:.4f}), linear {err:.4f} (band {bottom:.4f}-{top:.4f})")
        assert low <= back_err <= high
        assert bottom <= err <= top
