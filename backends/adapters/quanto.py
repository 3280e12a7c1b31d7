"""optimum-quanto formats: int8 and float8 weights with one scale per output row, and int4
in groups of 128 with a scale and a shift per group.

The values come from quanto itself (its Absmax/Max optimizers and `quantize_weight`); the
parts are the plain tensors inside the quanto tensor it returns. Dequantization is
quanto's own arithmetic written out on those tensors: quanto's int4 unpacking op
compiles a C++/CUDA extension on first use, which a ComfyUI install cannot count on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..engine.base import BackendAdapter, FormatSpec, require_format
from ..engine.errors import BackendUnavailable, FormatUnsupported, MalformedFile, UnknownFormat
from ..engine.registry import register

log = logging.getLogger(__name__)

GROUP_SIZE = 128
# fp16 keeps int4 at 4.25 bits (fp32 scales would make it 4.5) and has 3 more mantissa
# bits than bf16; weights never come near fp16's range limit.
INT4_SCALE_DTYPE = torch.float16
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class QuantoFormat(FormatSpec):
    qtype: str = "qint8"  # a key of optimum.quanto.qtypes


def _fmt(name, qtype, bits, desc, **kw):
    return QuantoFormat(backend="quanto", name=name, bits_per_weight=bits, description=desc,
                        qtype=qtype, **kw)


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() < 2:
        raise FormatUnsupported(f"quanto stores matrices and convolution weights; got a "
                                f"{weight.dim()}-D tensor of shape {tuple(weight.shape)}.")
    w = weight.detach().reshape(weight.shape[0], -1)
    return (w if w.dtype in _FLOATS else w.float()).contiguous()


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero row or group has scale 0; quanto would divide 0 by 0. Any scale stores it exactly.
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def unpack_int4(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """Inverse of quanto's pack_weights for 4 bits: row i sits in the low nibble of packed
    row i, row i + len(packed) in the high nibble."""
    return torch.cat([packed & 0x0F, packed >> 4])[:rows]


@register
class QuantoAdapter(BackendAdapter):
    name = "quanto"
    package = "optimum.quanto"
    pip_requirement = "optimum-quanto>=0.2.6"
    formats = {
        # 8 bits plus one fp32 scale per output row
        "int8": _fmt("int8", "qint8", 8.0, "int8 weights, one symmetric scale per output row"),
        "fp8": _fmt("fp8", "qfloat8_e4m3fn", 8.0, "float8 e4m3 weights, one scale per output row"),
        "int4": _fmt("int4", "qint4", 4.0 + 2 * 16 / GROUP_SIZE,
                     "int4 weights in groups of 128, fp16 scale and shift per group",
                     block_size=GROUP_SIZE, fallback="int8", keep_final_projection=True),
    }

    def _spec(self, spec: FormatSpec) -> QuantoFormat:
        if spec.backend != self.name:
            raise UnknownFormat(f"The quanto backend was given the format '{spec.id}' of another "
                                f"backend; use that backend's adapter for it.")
        return require_format(self, spec.name)

    def _quanto(self):
        problem = self.missing_package()
        if problem:
            raise BackendUnavailable(problem)
        import optimum.quanto as quanto

        return quanto

    # -- quantize -------------------------------------------------------------------
    def quantize(self, weight, spec):
        spec = self._spec(spec)
        problem = self.supports_shape(spec, weight.shape)
        if problem:
            raise FormatUnsupported(f"{spec.id} cannot store a weight of shape "
                                    f"{tuple(weight.shape)}: {problem}.")
        q = self._quanto()
        w = _as_matrix(weight)
        qtype = q.qtypes[spec.qtype]
        if qtype.bits == 8:
            scale = _nonzero(q.AbsmaxOptimizer()(w, qtype=qtype, axis=0))
            qt = q.quantize_weight(w, qtype=qtype, axis=0, scale=scale, optimized=False)
            return {"weight": qt._data.contiguous(), "scale": qt._scale.contiguous()}
        scale, shift = q.MaxOptimizer()(w, qtype=qtype, axis=0, group_size=GROUP_SIZE)
        # Round to the stored dtype first, so the codes are computed against what is kept.
        scale, shift = _nonzero(scale.to(INT4_SCALE_DTYPE)), shift.to(INT4_SCALE_DTYPE)
        qt = q.quantize_weight(w, qtype=qtype, axis=0, scale=scale, shift=shift,
                               group_size=GROUP_SIZE, optimized=False)
        packed = qt._data._data  # the uint8 tensor inside quanto's PackedTensor
        return {"weight": packed.contiguous(), "scale": qt._scale.contiguous(),
                "shift": qt._shift.contiguous()}

    # -- dequantize -----------------------------------------------------------------
    def dequantize(self, parts, spec, shape, dtype):
        spec = self._spec(spec)
        data, scale = parts.get("weight"), parts.get("scale")
        n = 1
        for d in shape:
            n *= int(d)
        if spec.qtype != "qint4":
            if data is None or scale is None or data.numel() != n:
                raise self._malformed(spec, shape, parts)
            # quanto: scale * data, in the scale's dtype
            w = scale * data.to(scale.dtype)
            return w.reshape(shape).to(dtype)
        shift = parts.get("shift")
        rows = n // GROUP_SIZE
        if data is None or scale is None or shift is None or scale.numel() != rows \
                or data.numel() != (rows + 1) // 2 * GROUP_SIZE:
            raise self._malformed(spec, shape, parts)
        codes = unpack_int4(data, rows)
        # quanto (float shift): scale * codes - shift, in the scale's dtype
        w = scale * codes.to(scale.dtype) - shift
        return w.reshape(shape).to(dtype)

    @staticmethod
    def _malformed(spec, shape, parts):
        return MalformedFile(
            f"The stored {spec.id} weight does not match its shape {tuple(shape)} (parts: "
            f"{ {k: tuple(v.shape) for k, v in parts.items()} }). The file is damaged or was "
            f"written for another layer; quantize the model again.")

    # -- compute --------------------------------------------------------------------
    def linear(self, x, parts, spec, shape, bias):
        spec = self._spec(spec)
        if spec.qtype == "qint4" or len(shape) != 2 or x.dtype not in _FLOATS or x.numel() == 0:
            return super().linear(x, parts, spec, shape, bias)
        self._quanto()  # registers quanto's ops
        data, scale = parts["weight"], parts["scale"]
        if data.shape != tuple(shape):
            raise self._malformed(spec, shape, parts)
        # quanto's weight-only matmul: on CPU with bf16 input and int8 weights it calls
        # torch._weight_int8pack_mm; elsewhere it scales the weight and multiplies.
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.ops.quanto.qbytes_mm(x2, data, scale.to(x.dtype))
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], data.shape[0])
