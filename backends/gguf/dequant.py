"""GGML block formats -> float, in plain vectorised torch (CPU, CUDA, torch.compile).

Every decoder has the same signature: (blocks: uint8 [n_blocks, type_size], dtype) ->
[n_blocks, block_len]. Arithmetic is done in float32 in the same order as ggml's
reference decoders (and gguf-py's numpy port), then cast, so results match them bit for bit.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Sequence

import torch

from ..engine.errors import FormatUnsupported, MalformedFile
from ..kernels.fast_linear import decode_gguf_blocks
from .types import BLOCK_SIZES, FLOAT_TYPES, QK_K, QUANTIZED


# -- byte helpers ------------------------------------------------------------------------
def _f16(pair: torch.Tensor) -> torch.Tensor:
    """[n, 2] little-endian fp16 bytes -> [n, 1] float32."""
    return pair.contiguous().view(torch.float16).float()


def _fields(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Splits each byte of [n, ..., L] into 8/width fields, lowest bits first:
    -> [n, ..., 8/width, L]."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=packed.device)
    return (packed.unsqueeze(-2) >> shifts.view(-1, 1)) & ((1 << width) - 1)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[n, 16] -> [n, 32]: low nibbles are weights 0..15, high nibbles 16..31."""
    return _fields(packed, 4).reshape(packed.shape[0], -1)


def _bits32(packed: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes of a little-endian uint32 -> [n, 32] bits, bit j for weight j."""
    return _fields(packed, 1).transpose(1, 2).reshape(packed.shape[0], 32)


def _k_scales_mins(packed: torch.Tensor):
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat((a & 63, (c & 0xF) | ((a >> 2) & 0x30)), dim=1)
    mins = torch.cat((b & 63, (c >> 4) | ((b >> 2) & 0x30)), dim=1)
    return scales, mins


# -- legacy formats: blocks of 32, one scale (and min) per block ----------------------------
def dequant_q8_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    d = _f16(blocks[:, 0:2])
    q = blocks[:, 2:].contiguous().view(torch.int8).float()
    return (q * d).to(dtype)


def dequant_q5_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    d = _f16(blocks[:, 0:2])
    q = _nibbles(blocks[:, 6:22]) | (_bits32(blocks[:, 2:6]) << 4)
    return (d * (q.to(torch.int8) - 16).float()).to(dtype)


def dequant_q5_1(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 8:24]) | (_bits32(blocks[:, 4:8]) << 4)
    return (d * q.float() + m).to(dtype)


def dequant_q4_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    d = _f16(blocks[:, 0:2])
    q = _nibbles(blocks[:, 2:18])
    return (d * (q.to(torch.int8) - 8).float()).to(dtype)


def dequant_q4_1(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 4:20])
    return (d * q.float() + m).to(dtype)


# -- K formats: super-blocks of 256 made of 8 or 16 sub-blocks with quantized scales ---------
def dequant_q6_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = blocks.shape[0]
    # Each half (128 weights) = 4 groups of 32: groups 0,1 take low nibbles of ql[0:32],
    # ql[32:64]; groups 2,3 the high nibbles; qh byte l holds the 2 top bits of all 4 groups.
    low = _fields(blocks[:, 0:128].reshape(n, 2, 64), 4).reshape(n, 8, 32)
    high = _fields(blocks[:, 128:192].reshape(n, 2, 32), 2).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).float().reshape(n, 16, 16)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(blocks[:, 208:210]) * scales
    return (d.unsqueeze(-1) * q).reshape(n, QK_K).to(dtype)


def dequant_q5_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    low = _fields(blocks[:, 48:176].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    high = _fields(blocks[:, 16:48], 1)  # [n, 8, 32]: bit j of byte l -> sub-block j
    q = (low | (high << 4)).float()
    dl = (d * scales.float()).unsqueeze(-1)
    ml = (dmin * mins.float()).unsqueeze(-1)
    return (dl * q - ml).reshape(n, QK_K).to(dtype)


def dequant_q4_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    q = _fields(blocks[:, 16:144].reshape(n, 4, 32), 4).reshape(n, 8, 32).float()
    dl = (d * scales.float()).unsqueeze(-1)
    ml = (dmin * mins.float()).unsqueeze(-1)
    return (dl * q - ml).reshape(n, QK_K).to(dtype)


def dequant_q3_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = blocks.shape[0]
    packed = blocks[:, 96:108]
    low = torch.cat((packed[:, 0:8] & 0xF, packed[:, 0:8] >> 4), dim=1)
    high = _fields(packed[:, 8:12], 2).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (_f16(blocks[:, 108:110]) * scales).unsqueeze(-1)
    q2 = _fields(blocks[:, 32:96].reshape(n, 2, 32), 2).reshape(n, 16, 16)
    hbit = _fields(blocks[:, 0:32], 1).reshape(n, 16, 16)
    # a set hmask bit means "no offset"; a clear one subtracts 4
    q = (q2.to(torch.int8) - ((hbit ^ 1) << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K).to(dtype)


def dequant_q2_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = blocks.shape[0]
    packed = blocks[:, 0:16]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = (d * (packed & 0xF).float()).unsqueeze(-1)
    ml = (dmin * (packed >> 4).float()).unsqueeze(-1)
    q = _fields(blocks[:, 16:80].reshape(n, 2, 32), 2).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K).to(dtype)


# -- IQ4 formats: 4-bit indices into a fixed non-linear table (read only: no quantizer) -----
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _iq4_values(packed: torch.Tensor) -> torch.Tensor:
    """[n, ..., 16] index bytes -> [n, ..., 32] table values (low nibbles first)."""
    levels = torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=packed.device)
    return levels[_fields(packed, 4).flatten(-2).long()]


def dequant_iq4_nl(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (_f16(blocks[:, 0:2]) * _iq4_values(blocks[:, 2:18])).to(dtype)


def dequant_iq4_xs(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks[:, 0:2])
    high = blocks[:, 2:4].contiguous().view(torch.int16).int() & 0xFFFF  # 2 bits per sub-block
    low = _fields(blocks[:, 4:8], 4).transpose(1, 2).reshape(n, 8).int()  # 4 bits per sub-block
    shifts = torch.arange(0, 16, 2, device=blocks.device)
    scales = (low | (((high >> shifts) & 3) << 4)) - 32
    dl = (d * scales.float()).unsqueeze(-1)
    return (dl * _iq4_values(blocks[:, 8:136].reshape(n, 8, 16))).reshape(n, QK_K).to(dtype)


Dequantizer = Callable[[torch.Tensor, torch.dtype], torch.Tensor]

# types.py names each type's decoder; a name missing here fails at import
DEQUANTIZERS: Dict[str, Dequantizer] = {n: globals()[t.dequantizer] for n, t in QUANTIZED.items()}


def dequantize(raw: torch.Tensor, qtype: str, shape: Sequence[int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed GGML data (uint8 [rows, row_bytes], any row grouping) -> float tensor of `shape`.

    F32/F16/BF16 pass through: raw may be the float tensor itself or its bytes."""
    shape = tuple(int(s) for s in shape)
    n_weights = math.prod(shape)
    if qtype in FLOAT_TYPES:
        data = raw if raw.is_floating_point() else raw.contiguous().view(FLOAT_TYPES[qtype])
        if data.numel() != n_weights:
            raise MalformedFile(f"GGUF {qtype} data holds {data.numel()} values but the shape "
                                f"{list(shape)} needs {n_weights}. The tensor or its shape is "
                                f"corrupt: re-create or re-download the file.")
        return data.reshape(shape).to(dtype)
    decode = DEQUANTIZERS.get(qtype)
    if decode is None:
        raise FormatUnsupported(f"GGML type '{qtype}' cannot be dequantized here; supported: "
                                f"{', '.join([*FLOAT_TYPES, *DEQUANTIZERS])}. Re-quantize the "
                                f"model to one of these types.")
    block_len, type_size = BLOCK_SIZES[qtype]
    if raw.dtype != torch.uint8:
        raise MalformedFile(f"GGUF {qtype} data must be a uint8 tensor of packed blocks, got "
                            f"{raw.dtype}. Pass the raw bytes read from the file.")
    if n_weights % block_len or raw.numel() != n_weights // block_len * type_size:
        raise MalformedFile(f"GGUF {qtype} data has {raw.numel()} bytes, which does not match "
                            f"the shape {list(shape)} ({n_weights} weights in blocks of "
                            f"{block_len} x {type_size} bytes). The tensor or its shape is "
                            f"corrupt: re-create or re-download the file.")
    fast = decode_gguf_blocks(raw, qtype, n_weights, dtype)
    if fast is not None:
        return fast.reshape(shape)
    blocks = raw.reshape(-1, type_size)
    return decode(blocks, dtype).reshape(shape)
