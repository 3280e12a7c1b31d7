"""GGUF formats (llama.cpp block quantization): legacy Q8_0..Q4_1 and K-quants Q6_K..Q2_K.

Weights are packed into GGML blocks by gguf_quantize and decoded by gguf_dequant, both
plain torch, so a layer stores exactly the bytes a .gguf file would hold. The formats, their
order and descriptions come from the type table (types.py).
"""
from __future__ import annotations

import torch

from ..engine.base import BackendAdapter, FormatSpec, require_format
from ..kernels.decode_groups import DecodePlan
from .dequant import dequantize
from .library import GGUF_REQUIREMENT
from .quantize import quantize
from .types import GGMLType, QUANTIZED
from ..engine.registry import register


def _fmt(t: GGMLType) -> FormatSpec:
    return FormatSpec(backend="gguf", name=t.name, bits_per_weight=t.bits_per_weight,
                      description=t.description, block_size=t.block_len, fallback=t.fallback,
                      keep_final_projection=t.nominal_bits <= 4, read_only=t.quantizer is None)


@register
class GGUFAdapter(BackendAdapter):
    name = "gguf"
    # In memory these formats need only torch; gguf-py is for .gguf files (gguf_file checks it).
    package = "torch"
    pip_requirement = GGUF_REQUIREMENT
    formats = {name: _fmt(t) for name, t in QUANTIZED.items()}

    def quantize(self, weight: torch.Tensor, spec: FormatSpec):
        require_format(self, spec.name)
        return {"weight": quantize(weight.reshape(weight.shape[0], -1), spec.name)}

    def dequantize(self, parts, spec: FormatSpec, shape: torch.Size, dtype: torch.dtype):
        return dequantize(parts["weight"], spec.name, shape, dtype)

    def decode_plan(self, spec: FormatSpec, shape: torch.Size):
        try:
            from ..kernels.triton_gguf import TYPES  # the types the Triton decoder knows; no Triton, no plan
        except Exception:  # noqa: BLE001 (Triton missing or broken: layers decode on their own)
            return None
        return DecodePlan(spec.name, shape.numel()) if spec.name in TYPES else None
