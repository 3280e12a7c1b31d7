"""The GGML tensor types QuantKit knows: one row each, the one place their facts live.

The header parser, the decoders, the quantizers, the gguf formats (menu order, descriptions,
fallbacks, bits per weight), the Triton kernels and the README's tables all derive from
GGML_TYPES. Codec functions are named, not imported, so this module imports nothing of
QuantKit's and the kernels can read it without pulling in the torch decoders.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch


@dataclass(frozen=True)
class GGMLType:
    name: str
    block_len: int  # weights per block
    type_size: int  # bytes per block, scales included
    dtype: Optional[torch.dtype] = None  # float types only: stored as this torch dtype
    description: str = ""  # the gguf format's description (quantized types)
    nominal_bits: int = 0  # the N of "N-bit": 4 and below keep the final projection
    dequantizer: Optional[str] = None  # function in dequant.py
    quantizer: Optional[str] = None  # function in quantize.py; None: read from files only
    fallback: Optional[str] = None  # K-quants: type for layers whose width is not whole blocks
    kernel_id: Optional[int] = None  # the Triton decoders' id for it; None: torch ops only

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_len


def _float(name: str, dtype: torch.dtype) -> GGMLType:
    return GGMLType(name, 1, dtype.itemsize, dtype=dtype)


def _quant(name: str, block_len: int, type_size: int, nominal_bits: int, description: str,
           kernel_id: Optional[int] = None, fallback: Optional[str] = None,
           writable: bool = True) -> GGMLType:
    codec = name.lower()
    return GGMLType(name, block_len, type_size, description=description,
                    nominal_bits=nominal_bits, dequantizer=f"dequant_{codec}",
                    quantizer=f"quant_{codec}" if writable else None, fallback=fallback,
                    kernel_id=kernel_id)


QK_K = 256  # the K-quants' (and IQ4_XS's) super-block

# Floats first, then the quantized types in the formats menu's order.
GGML_TYPES: Dict[str, GGMLType] = {t.name: t for t in (
    _float("F32", torch.float32),
    _float("F16", torch.float16),
    _float("BF16", torch.bfloat16),
    _quant("Q8_0", 32, 34, 8, "8-bit, blocks of 32 with an fp16 scale", kernel_id=0),
    _quant("Q5_0", 32, 22, 5, "5-bit, blocks of 32 with an fp16 scale", kernel_id=3),
    _quant("Q5_1", 32, 24, 5, "5-bit, blocks of 32 with fp16 scale and min", kernel_id=4),
    _quant("Q4_0", 32, 18, 4, "4-bit, blocks of 32 with an fp16 scale", kernel_id=1),
    _quant("Q4_1", 32, 20, 4, "4-bit, blocks of 32 with fp16 scale and min", kernel_id=2),
    _quant("Q6_K", QK_K, 210, 6, "6-bit K-quant: 256-blocks of 16 sub-blocks, 8-bit scales",
           kernel_id=7, fallback="Q8_0"),
    _quant("Q5_K", QK_K, 176, 5,
           "5-bit K-quant: 256-blocks of 8 sub-blocks, 6-bit scales and mins",
           kernel_id=6, fallback="Q5_1"),
    _quant("Q4_K", QK_K, 144, 4,
           "4-bit K-quant: 256-blocks of 8 sub-blocks, 6-bit scales and mins",
           kernel_id=5, fallback="Q4_1"),
    _quant("Q3_K", QK_K, 110, 3, "3-bit K-quant: 256-blocks of 16 sub-blocks, 6-bit scales",
           kernel_id=8, fallback="Q4_0"),
    _quant("Q2_K", QK_K, 84, 2,
           "2-bit K-quant: 256-blocks of 16 sub-blocks, 4-bit scales and mins",
           kernel_id=9, fallback="Q4_0"),
    # read from files only (Load GGUF Model / CLIP); not in Quantize Model's list
    _quant("IQ4_NL", 32, 18, 4, "4-bit non-linear levels, blocks of 32 with an fp16 scale",
           writable=False),
    _quant("IQ4_XS", QK_K, 136, 4,
           "4-bit non-linear levels, 256-blocks with 6-bit sub-block scales", writable=False),
)}

FLOAT_TYPES: Dict[str, torch.dtype] = {n: t.dtype for n, t in GGML_TYPES.items()
                                        if t.dtype is not None}
QUANTIZED: Dict[str, GGMLType] = {n: t for n, t in GGML_TYPES.items() if t.dtype is None}
# type name -> (weights per block, bytes per block), quantized types
BLOCK_SIZES: Dict[str, Tuple[int, int]] = {n: (t.block_len, t.type_size)
                                           for n, t in QUANTIZED.items()}
