"""torchao's formats: int8/fp8 weight-only, dynamic int8 (W8A8) and fp8 row-wise, int4 tinygemm.

The 8-bit formats are torchao's symmetric per-channel schemes written out in torch and
computed through fast_linear (fused Triton kernels, torch._scaled_mm, torch._int_mm on the
CPU): they do not need the torchao package. int4 uses torchao's group-wise quantizer and
tinygemm packing, so it does. Every format keeps plain tensors, so stored bytes stay honest.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import fast_linear
from ..kernels.decode_groups import INT8_ROWS, DecodePlan
from ..engine.base import BackendAdapter, FormatSpec, require_format
from ..engine.errors import FormatUnsupported
from ..engine.registry import register

FP8 = fast_linear.FP8
FP8_MAX = fast_linear.FP8_MAX
INT4_GROUP = 128


def _flat(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


class _Int8Rows:
    """int8 per output row, scale = amax / 127 (torchao's choose_qparams_affine and
    quantize_affine written out: the same values, tests check, 12x faster on the CPU)."""

    def __init__(self, dynamic: bool):
        self.dynamic = dynamic  # also quantize the activations per row (W8A8)

    def quantize(self, w):
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
        return {"weight": q.contiguous(), "scale": scale}

    def dequantize(self, parts, shape, dtype):
        return fast_linear.dequantize_rows(parts["weight"], parts["scale"], dtype).reshape(shape)

    def linear(self, x2, parts, bias):
        return fast_linear.int8_linear(x2, parts["weight"], parts["scale"], bias, dynamic=self.dynamic)

    def decode_plan(self, shape):
        if self.dynamic:  # quantizes its activations too: computes its own way
            return None
        return DecodePlan(INT8_ROWS, shape.numel(), scale="weight_scale", row_len=shape.numel() // shape[0])


class _Fp8Rows(_Int8Rows):
    """float8 e4m3 per output row, scale = amax / 448."""

    def quantize(self, w):
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
        return {"weight": (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), "scale": scale}

    def linear(self, x2, parts, bias):
        return fast_linear.fp8_linear(x2, parts["weight"], parts["scale"], bias, dynamic=self.dynamic)

    def decode_plan(self, shape):
        return None


class _Int4Tinygemm:
    """int4 in groups of 128 with scale and zero, packed for the GPU's tinygemm kernel."""

    def quantize(self, w):
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

    def dequantize(self, parts, shape, dtype):
        k = int(shape[1])
        eye = torch.eye(k, device=parts["weight"].device, dtype=torch.bfloat16)
        wt = torch.ops.aten._weight_int4pack_mm(eye, parts["weight"], INT4_GROUP, parts["scales_and_zeros"])
        return wt.t().to(dtype).reshape(shape)

    def linear(self, x2, parts, bias):
        if not x2.is_cuda:
            return None  # the adapter dequantizes instead
        y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), parts["weight"],
                                               INT4_GROUP, parts["scales_and_zeros"]).to(x2.dtype)
        return y if bias is None else y + bias

    def decode_plan(self, shape):
        return None


def _fmt(name, bits, desc, **kw):
    return FormatSpec(backend="torchao", name=name, bits_per_weight=bits, description=desc, **kw)


# One row per format: what it is, and the scheme that stores and computes it.
_TABLE = (
    (_fmt("int8wo", 8.0, "int8 weights, per-channel scale; computes in bf16/fp16", needs_package=False),
     _Int8Rows(dynamic=False)),
    (_fmt("int8dq", 8.0, "int8 weights and per-token int8 activations (W8A8), int8 matrix products",
          needs_package=False),
     _Int8Rows(dynamic=True)),
    (_fmt("fp8wo", 8.0, "float8 e4m3 weights, per-channel scale; computes in bf16", needs_package=False),
     _Fp8Rows(dynamic=False)),
    (_fmt("fp8dq", 8.0, "float8 weights and row-wise float8 activations (torch._scaled_mm)",
          needs_cuda=True, min_compute_capability=(8, 9), conv_ok=False, needs_package=False),
     _Fp8Rows(dynamic=True)),
    (_fmt("int4wo", 4.25, "int4 weights, groups of 128 with scale and zero (tinygemm kernel)",
          needs_cuda=True, min_compute_capability=(8, 0), block_size=INT4_GROUP, conv_ok=False,
          keep_final_projection=True),
     _Int4Tinygemm()),
)
_SCHEMES = {spec.name: scheme for spec, scheme in _TABLE}


@register
class TorchAOAdapter(BackendAdapter):
    name = "torchao"
    package = "torchao"
    pip_requirement = "torchao>=0.10.0"
    formats = {spec.name: spec for spec, _ in _TABLE}

    def _scheme(self, spec):
        try:
            return _SCHEMES[spec.name]
        except KeyError:  # checked only on a miss: a layer's forward stays one dict lookup
            require_format(self, spec.name)  # raises UnknownFormat, naming the formats offered
            raise

    def quantize(self, weight, spec):
        return self._scheme(spec).quantize(_flat(weight.float()))

    def dequantize(self, parts, spec, shape, dtype):
        return self._scheme(spec).dequantize(parts, shape, dtype)

    def decode_plan(self, spec, shape):
        return self._scheme(spec).decode_plan(shape)

    def linear(self, x, parts, spec, shape, bias):
        lead, k = x.shape[:-1], x.shape[-1]
        y = self._scheme(spec).linear(x.reshape(-1, k), parts, bias)
        if y is None:
            return F.linear(x, self.dequantize(parts, spec, shape, x.dtype), bias)
        return y.reshape(*lead, y.shape[-1])
