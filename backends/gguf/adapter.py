"""GGUF formats (llama.cpp block quantization): legacy Q8_0..Q4_1 and K-quants Q6_K..Q2_K.

Weights are packed into GGML blocks by gguf_quantize and decoded by gguf_dequant, both
plain torch, so a layer stores exactly the bytes a .gguf file would hold.
"""
from __future__ import annotations

import torch

from ..engine.base import BackendAdapter, FormatSpec, require_format
from ..kernels.decode_groups import DecodePlan
from .dequant import dequantize
from .library import GGUF_REQUIREMENT
from .quantize import QUANT_TYPES, quantize
from ..engine.registry import register


def _fmt(name: str, description: str, fallback=None, nominal_bits: int = 8,
         read_only: bool = False) -> FormatSpec:
    qt = QUANT_TYPES[name]
    return FormatSpec(backend="gguf", name=name, bits_per_weight=qt.bits_per_weight,
                      description=description, block_size=qt.block_len, fallback=fallback,
                      keep_final_projection=nominal_bits <= 4, read_only=read_only)


@register
class GGUFAdapter(BackendAdapter):
    name = "gguf"
    # In memory these formats need only torch; gguf-py is for .gguf files (gguf_file checks it).
    package = "torch"
    pip_requirement = GGUF_REQUIREMENT
    formats = {
        "Q8_0": _fmt("Q8_0", "8-bit, blocks of 32 with an fp16 scale"),
        "Q5_0": _fmt("Q5_0", "5-bit, blocks of 32 with an fp16 scale", nominal_bits=5),
        "Q5_1": _fmt("Q5_1", "5-bit, blocks of 32 with fp16 scale and min", nominal_bits=5),
        "Q4_0": _fmt("Q4_0", "4-bit, blocks of 32 with an fp16 scale", nominal_bits=4),
        "Q4_1": _fmt("Q4_1", "4-bit, blocks of 32 with fp16 scale and min", nominal_bits=4),
        "Q6_K": _fmt("Q6_K", "6-bit K-quant: 256-blocks of 16 sub-blocks, 8-bit scales",
                     fallback="Q8_0", nominal_bits=6),
        "Q5_K": _fmt("Q5_K", "5-bit K-quant: 256-blocks of 8 sub-blocks, 6-bit scales and mins",
                     fallback="Q5_1", nominal_bits=5),
        "Q4_K": _fmt("Q4_K", "4-bit K-quant: 256-blocks of 8 sub-blocks, 6-bit scales and mins",
                     fallback="Q4_1", nominal_bits=4),
        "Q3_K": _fmt("Q3_K", "3-bit K-quant: 256-blocks of 16 sub-blocks, 6-bit scales",
                     fallback="Q4_0", nominal_bits=3),
        "Q2_K": _fmt("Q2_K", "2-bit K-quant: 256-blocks of 16 sub-blocks, 4-bit scales and mins",
                     fallback="Q4_0", nominal_bits=2),
        # read from files only (Load GGUF Model / CLIP); not in Quantize Model's list
        "IQ4_NL": _fmt("IQ4_NL", "4-bit non-linear levels, blocks of 32 with an fp16 scale",
                       nominal_bits=4, read_only=True),
        "IQ4_XS": _fmt("IQ4_XS", "4-bit non-linear levels, 256-blocks with 6-bit sub-block scales",
                       nominal_bits=4, read_only=True),
    }

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
