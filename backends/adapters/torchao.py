"""torchao formats: int8/fp8 weight-only, dynamic int8 (W8A8) and fp8 row-wise, int4 tinygemm.

int8 follows torchao's symmetric per-channel scheme, int4 uses torchao's group-wise
quantizer and tinygemm packing. The 8-bit formats compute through fast_linear (fused Triton
kernels, torch._scaled_mm, torch._int_mm on the CPU), on plain tensors so that stored
bytes stay honest.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import fast_linear
from ..kernels.decode_groups import INT8_ROWS, DecodePlan
from ..engine.base import BackendAdapter, FormatSpec
from ..engine.errors import FormatUnsupported
from ..engine.registry import register

FP8 = fast_linear.FP8
FP8_MAX = fast_linear.FP8_MAX
INT4_GROUP = 128


def _fmt(name, bits, desc, **kw):
    return FormatSpec(backend="torchao", name=name, bits_per_weight=bits, description=desc, **kw)


def _flat(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


@register
class TorchAOAdapter(BackendAdapter):
    name = "torchao"
    package = "torchao"
    pip_requirement = "torchao>=0.10.0"
    formats = {
        "int8wo": _fmt("int8wo", 8.0, "int8 weights, per-channel scale; computes in bf16/fp16"),
        "int8dq": _fmt("int8dq", 8.0, "int8 weights and per-token int8 activations (W8A8), "
                                      "int8 matrix products"),
        "fp8wo": _fmt("fp8wo", 8.0, "float8 e4m3 weights, per-channel scale; computes in bf16"),
        "fp8dq": _fmt("fp8dq", 8.0, "float8 weights and row-wise float8 activations "
                                    "(torch._scaled_mm)", needs_cuda=True,
                      min_compute_capability=(8, 9), conv_ok=False),
        "int4wo": _fmt("int4wo", 4.25, "int4 weights, groups of 128 with scale and zero "
                                       "(tinygemm kernel)", needs_cuda=True,
                       min_compute_capability=(8, 0), block_size=INT4_GROUP, conv_ok=False,
                       keep_final_projection=True),
    }

    # -- quantize -------------------------------------------------------------------
    def quantize(self, weight, spec):
        w = _flat(weight.float())
        if spec.name in ("int8wo", "int8dq"):
            return self._quantize_int8(w)
        if spec.name in ("fp8wo", "fp8dq"):
            scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
            return {"weight": (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), "scale": scale}
        if spec.name == "int4wo":
            return self._quantize_int4(w)
        raise FormatUnsupported(f"torchao: unhandled format {spec.name}")

    @staticmethod
    def _quantize_int8(w):
        # torchao's symmetric per-channel int8 (choose_qparams_affine + quantize_affine,
        # range +-127) written out: the same values (tests check), 12x faster on CPU.
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
        return {"weight": q.contiguous(), "scale": scale}

    @staticmethod
    def _quantize_int4(w):
        if w.device.type != "cuda":
            raise FormatUnsupported("torchao:int4wo packs weights for the GPU's tinygemm kernel "
                                    "and must be quantized on a CUDA device.")
        from torchao.quantization.utils import groupwise_affine_quantize_tensor
        w = w.to(torch.bfloat16)
        int_data, scales_and_zeros = groupwise_affine_quantize_tensor(w, 4, INT4_GROUP, torch.bfloat16)
        if int_data.shape[1] == w.shape[1]:  # older torchao: one value a byte, pack pairs here
            int_data = (int_data[:, ::2] << 4 | int_data[:, 1::2])
        packed = torch.ops.aten._convert_weight_to_int4pack(int_data.to(torch.uint8).contiguous(), 8)
        return {"weight": packed, "scales_and_zeros": scales_and_zeros.contiguous()}

    # -- dequantize -----------------------------------------------------------------
    def dequantize(self, parts, spec, shape, dtype):
        if spec.name == "int4wo":
            k = int(shape[1])
            eye = torch.eye(k, device=parts["weight"].device, dtype=torch.bfloat16)
            wt = torch.ops.aten._weight_int4pack_mm(eye, parts["weight"], INT4_GROUP,
                                                    parts["scales_and_zeros"])
            return wt.t().to(dtype).reshape(shape)
        return fast_linear.dequantize_rows(parts["weight"], parts["scale"], dtype).reshape(shape)

    def decode_plan(self, spec, shape):
        if spec.name != "int8wo":  # the others quantize activations too, or are not int8 rows
            return None
        return DecodePlan(INT8_ROWS, shape.numel(), scale="weight_scale", row_len=shape.numel() // shape[0])

    # -- compute --------------------------------------------------------------------
    def linear(self, x, parts, spec, shape, bias):
        if spec.name == "int4wo":
            if not x.is_cuda:
                return F.linear(x, self.dequantize(parts, spec, shape, x.dtype), bias)
            return self._int4(x, parts, bias)
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        compute = _COMPUTE[spec.name]
        y = compute(x2, parts["weight"], parts["scale"], bias, dynamic=spec.name.endswith("dq"))
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def _int4(x, parts, bias):
        lead, k = x.shape[:-1], x.shape[-1]
        xb = x.reshape(-1, k).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm(xb, parts["weight"], INT4_GROUP,
                                               parts["scales_and_zeros"]).to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, y.shape[-1])


_COMPUTE = {"int8wo": fast_linear.int8_linear, "int8dq": fast_linear.int8_linear,
            "fp8wo": fast_linear.fp8_linear, "fp8dq": fast_linear.fp8_linear}
