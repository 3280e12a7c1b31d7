"""One Triton kernel that decodes GGML blocks straight into bf16/fp16/fp32 (NVIDIA GPUs only).

The plain torch decoders in gguf_dequant take 6-15 kernels and float32 temporaries four
times the size of the output per layer and call; this reads each packed byte once and
writes the output once. Each output element finds its block, its scale bytes and its
quantized bits from the byte layout that gguf_dequant documents; the arithmetic is
float32 in ggml's order, so results equal gguf-py's decoders up to fused multiply-adds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gguf.types import QUANTIZED
from .triton_8bit import _launch

# GGML type -> (kernel id, weights per block, bytes per block); an id selects a KIND branch
# of _decode_elements
TYPES = {t.name: (t.kernel_id, t.block_len, t.type_size)
         for t in QUANTIZED.values() if t.kernel_id is not None}
_ELEMENTS_PER_PROGRAM = 1024


@triton.jit
def _byte(p):
    return tl.load(p).to(tl.int32)


@triton.jit
def _f16(p):
    bits = (tl.load(p).to(tl.uint16) | (tl.load(p + 1).to(tl.uint16) << 8))
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nibble(p, w):
    """Legacy 32-blocks: weight w < 16 is the low nibble of byte w, w >= 16 the high one of
    byte w - 16."""
    return (_byte(p + (w % 16)) >> ((w // 16) * 4)) & 15


@triton.jit
def _bit(p, i):
    return (_byte(p + i // 8) >> (i % 8)) & 1


@triton.jit
def _k_scale_min(s, sub):
    """Q4_K/Q5_K: the 6-bit scale and min of sub-block sub (0..7) from 12 packed bytes."""
    low = sub < 4
    hi_sub = tl.where(low, sub, sub - 4)
    a = _byte(s + hi_sub)        # bytes 0..3
    b = _byte(s + hi_sub + 4)    # bytes 4..7
    c = _byte(s + hi_sub + 8)    # bytes 8..11 (read for every sub, used for sub >= 4)
    scale = tl.where(low, a & 63, (c & 15) | ((a >> 6) << 4))
    mn = tl.where(low, b & 63, (c >> 4) | ((b >> 6) << 4))
    return scale.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _crumb(p, w):
    """Q2_K/Q3_K/Q6_K high bits: per 128-weight half, groups of 32 take 2-bit fields 0..3 of
    the half's 32 bytes."""
    half, r = w // 128, w % 128
    return (_byte(p + half * 32 + r % 32) >> ((r // 32) * 2)) & 3


@triton.jit
def _decode_kernel(raw_ptr, out_ptr, n_out, KIND: tl.constexpr, BLOCK_LEN: tl.constexpr,
                   TYPE_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    _decode_elements(raw_ptr, out_ptr, n_out, tl.program_id(0), KIND, BLOCK_LEN, TYPE_SIZE, BLOCK)


@triton.jit
def _decode_elements(raw_ptr, out_ptr, n_out, pid, KIND: tl.constexpr, BLOCK_LEN: tl.constexpr,
                     TYPE_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Output elements [pid * BLOCK, (pid + 1) * BLOCK) of one tensor of type KIND."""
    o = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = o < n_out
    o = tl.where(inside, o, 0)
    w = (o % BLOCK_LEN).to(tl.int32)
    base = raw_ptr + (o // BLOCK_LEN) * TYPE_SIZE
    if KIND == 0:    # Q8_0: fp16 d, 32 int8
        y = tl.load(base + 2 + w).to(tl.int8, bitcast=True).to(tl.float32) * _f16(base)
    elif KIND == 1:  # Q4_0: fp16 d, 16 bytes of nibbles, offset 8
        y = _f16(base) * (_nibble(base + 2, w) - 8).to(tl.float32)
    elif KIND == 2:  # Q4_1: fp16 d, fp16 m, nibbles
        y = _f16(base) * _nibble(base + 4, w).to(tl.float32) + _f16(base + 2)
    elif KIND == 3:  # Q5_0: fp16 d, 32 high bits, nibbles, offset 16
        q = _nibble(base + 6, w) | (_bit(base + 2, w) << 4)
        y = _f16(base) * (q - 16).to(tl.float32)
    elif KIND == 4:  # Q5_1: fp16 d, fp16 m, 32 high bits, nibbles
        q = _nibble(base + 8, w) | (_bit(base + 4, w) << 4)
        y = _f16(base) * q.to(tl.float32) + _f16(base + 2)
    elif KIND == 5 or KIND == 6:  # Q4_K / Q5_K: d, dmin, 12 scale bytes, [32 high-bit bytes], qs
        sub = w // 32
        scale, mn = _k_scale_min(base + 4, sub)
        qs = base + (16 + 32 * (KIND - 5))
        q = (_byte(qs + (w // 64) * 32 + w % 32) >> ((sub % 2) * 4)) & 15
        if KIND == 6:
            q = q | (((_byte(base + 16 + w % 32) >> sub) & 1) << 4)
        y = (_f16(base) * scale) * q.to(tl.float32) - _f16(base + 2) * mn
    elif KIND == 7:  # Q6_K: 128 bytes low nibbles, 64 bytes 2-bit highs, 16 int8 scales, d
        half, r = w // 128, w % 128
        low = (_byte(base + half * 64 + r % 64) >> ((r // 64) * 4)) & 15
        q = (low | (_crumb(base + 128, w) << 4)) - 32
        scale = tl.load(base + 192 + w // 16).to(tl.int8, bitcast=True).to(tl.float32)
        y = (_f16(base + 208) * scale) * q.to(tl.float32)
    elif KIND == 8:  # Q3_K: 32 bytes hmask, 64 bytes 2-bit lows, 12 bytes 6-bit scales, d
        i = w // 16
        s = base + 96
        low = (_byte(s + i % 8) >> ((i // 8) * 4)) & 15
        high = (_byte(s + 8 + i % 4) >> ((i // 4) * 2)) & 3
        scale = ((low | (high << 4)) - 32).to(tl.float32)
        hbit = (_byte(base + w % 32) >> (w // 32)) & 1
        q = _crumb(base + 32, w) - ((hbit ^ 1) << 2)
        y = (_f16(base + 108) * scale) * q.to(tl.float32)
    else:            # Q2_K: 16 bytes of 4-bit scale|min, 64 bytes 2-bit weights, d, dmin
        packed = _byte(base + w // 16)
        dl = _f16(base + 80) * (packed & 15).to(tl.float32)
        ml = _f16(base + 82) * (packed >> 4).to(tl.float32)
        y = dl * _crumb(base + 16, w).to(tl.float32) - ml
    tl.store(out_ptr + o, y.to(out_ptr.dtype.element_ty), mask=inside)


def decode(raw: torch.Tensor, qtype: str, n_weights: int, dtype: torch.dtype) -> torch.Tensor:
    """Contiguous uint8 blocks of `qtype` on a CUDA device -> flat [n_weights] of dtype."""
    kind, block_len, type_size = TYPES[qtype]
    out = torch.empty(n_weights, dtype=dtype, device=raw.device)
    if n_weights:
        _launch(_decode_kernel, (triton.cdiv(n_weights, _ELEMENTS_PER_PROGRAM),),
                (raw, out, n_weights),
                {"KIND": kind, "BLOCK_LEN": block_len, "TYPE_SIZE": type_size,
                 "BLOCK": _ELEMENTS_PER_PROGRAM}, num_warps=4, num_stages=1)
    return out
