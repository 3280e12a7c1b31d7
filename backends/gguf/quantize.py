"""Float weights -> GGML blocks, in plain vectorised torch.

Legacy types (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1) follow ggml's reference quantizers, so they
produce the same bytes as llama.cpp / gguf-py. gguf-py has no K-quant quantizers; ours
pick each sub-block's scale (and min) from a few candidate scales by least squares,
quantize those to the format's 4/6/8-bit levels (trying both neighbouring levels), and
round the weights against the scales actually stored. Each candidate is evaluated for
all blocks at once: Python loops run over candidates and row chunks, never blocks.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

from ..engine.errors import FormatUnsupported
from .types import BLOCK_SIZES, QUANTIZED

# Candidate offsets added to the top quantized level when choosing a sub-block scale
# (0 = the plain range / levels scale); ggml's reference searches a similar range.
_SCALE_STEPS = (-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0)
_CHUNK_WEIGHTS = 1 << 20  # weights processed at once: bounds memory, stays in cache


# -- byte helpers ------------------------------------------------------------------------
def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[n] or [n, 1] float -> [n, 2] little-endian fp16 bytes."""
    return x.reshape(-1, 1).to(torch.float16).view(torch.uint8)


def _pack(fields: torch.Tensor, width: int) -> torch.Tensor:
    """[..., 8/width, L] small ints -> [..., L] bytes, field k in bits k*width.. (the
    inverse of gguf_dequant._fields)."""
    count = fields.shape[-2]
    weights = (1 << (torch.arange(count, device=fields.device) * width)).to(torch.int32)
    return (fields.to(torch.int32) * weights.view(-1, 1)).sum(dim=-2).to(torch.uint8)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C roundf (ties away from zero), exact for every float; torch.round ties to even."""
    a = v.abs()
    f = a.floor()
    return torch.copysign(f + (2 * (a - f)).floor(), v)


def _safe_inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last dim, sign kept (keepdim)."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))


# -- legacy formats (ggml reference algorithms) ------------------------------------------
def quant_q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(dim=1, keepdim=True) / 127
    q = _round_half_away(x * _safe_inv(d)).to(torch.int8).view(torch.uint8)
    return torch.cat((_f16_bytes(d), q), dim=1)


def _symmetric_legacy(x: torch.Tensor, levels: int):
    half = levels // 2
    d = _signed_absmax(x) / -half
    q = torch.trunc(x * _safe_inv(d) + (half + 0.5)).clamp(0, levels - 1).to(torch.uint8)
    return d, q


def _affine_legacy(x: torch.Tensor, levels: int):
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    d = (hi - lo) / (levels - 1)
    q = torch.trunc((x - lo) * _safe_inv(d) + 0.5).clamp(0, levels - 1).to(torch.uint8)
    return d, lo, q


def _nibble_pack(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] -> [n, 16]: weight j in the low nibble of byte j, weight j+16 in the high."""
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _high_bits32(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of 32 weights -> 4 bytes of a little-endian uint32."""
    return _pack(((q >> 4) & 1).reshape(-1, 4, 8).transpose(1, 2), 1)


def quant_q5_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric_legacy(x, 32)
    return torch.cat((_f16_bytes(d), _high_bits32(q), _nibble_pack(q)), dim=1)


def quant_q5_1(x: torch.Tensor) -> torch.Tensor:
    d, lo, q = _affine_legacy(x, 32)
    return torch.cat((_f16_bytes(d), _f16_bytes(lo), _high_bits32(q), _nibble_pack(q)), dim=1)


def quant_q4_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric_legacy(x, 16)
    return torch.cat((_f16_bytes(d), _nibble_pack(q)), dim=1)


def quant_q4_1(x: torch.Tensor) -> torch.Tensor:
    d, lo, q = _affine_legacy(x, 16)
    return torch.cat((_f16_bytes(d), _f16_bytes(lo), _nibble_pack(q)), dim=1)


# -- sub-block scale search for K formats ------------------------------------------------
def _fit_affine(x: torch.Tensor, nmax: int):
    """x [n, S, L] ~ scale * q - min with q in 0..nmax, scale >= 0, min >= 0.
    Returns (scale, min), each [n, S, 1]."""
    length = x.shape[-1]
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    span = x.amax(dim=-1, keepdim=True) - lo
    sx, sxx = x.sum(-1, keepdim=True), (x * x).sum(-1, keepdim=True)
    best_scale, best_min = span / nmax, -lo
    best_err = torch.full_like(span, float("inf"))
    for step in _SCALE_STEPS:
        q = ((x - lo) * _safe_inv(span / (nmax + step))).round().clamp(0, nmax)
        sq, sqq = q.sum(-1, keepdim=True), (q * q).sum(-1, keepdim=True)
        sxq = (x * q).sum(-1, keepdim=True)
        det = length * sqq - sq * sq
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        scale = (length * sxq - sq * sx) / det
        offset = (sqq * sx - sq * sxq) / det  # x ~ scale * q + offset
        # the format stores a subtracted, non-negative min: refit with offset = 0 if needed
        clip = offset > 0
        scale = torch.where(clip, sxq / sqq.clamp(min=1), scale).clamp(min=0)
        offset = torch.where(clip, torch.zeros_like(offset), offset)
        err = (sxx - 2 * scale * sxq - 2 * offset * sx + scale * scale * sqq
               + 2 * scale * offset * sq + length * offset * offset)
        better = ok & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, -offset, best_min)
    return best_scale, best_min


def _fit_symmetric(x: torch.Tensor, nmax: int):
    """x [n, S, L] ~ scale * q with q in -nmax..nmax-1; scale may be negative so that the
    largest magnitude lands on the roomier -nmax side. Returns scale [n, S, 1]."""
    amax = _signed_absmax(x)
    best_scale = amax / -nmax
    best_gain = torch.zeros_like(amax)
    for step in _SCALE_STEPS:
        q = (x * _safe_inv(amax / -(nmax + step))).round().clamp(-nmax, nmax - 1)
        sqq, sxq = (q * q).sum(-1, keepdim=True), (x * q).sum(-1, keepdim=True)
        # least-squares scale for these q; the error it leaves is sum(x^2) - sxq^2 / sqq
        gain = sxq * sxq / sqq.clamp(min=1)
        better = gain > best_gain
        best_gain = torch.where(better, gain, best_gain)
        best_scale = torch.where(better, sxq / sqq.clamp(min=1), best_scale)
    return best_scale


def _super_scale(values: torch.Tensor, top: int, lo: int = 0) -> torch.Tensor:
    """fp16-representable super-block scale [n, 1] mapping the sub-block values [n, S]
    onto integer levels lo..top. Signed (lo < 0): the largest magnitude goes to lo."""
    if lo < 0:
        return (_signed_absmax(values) / lo).to(torch.float16).float()
    return (values.amax(dim=-1, keepdim=True) / top).to(torch.float16).float()


def _neighbour_levels(values: torch.Tensor, d: torch.Tensor, lo: int, top: int):
    ratio = values * _safe_inv(d)
    return ratio.floor().clamp(lo, top), ratio.ceil().clamp(lo, top)


def _keep_better(best, err, *values):
    """Running per-sub-block arg-min over candidates: best = [err, *values]."""
    if best is None:
        return [err, *values]
    better = err < best[0]
    out = [torch.where(better, err, best[0])]
    for new, old in zip(values, best[1:]):
        mask = better.reshape(better.shape + (1,) * (new.dim() - better.dim()))
        out.append(torch.where(mask, new, old))
    return out


def _affine_k(x: torch.Tensor, sub_len: int, nmax: int, level_top: int):
    """Shared part of Q2_K/Q4_K/Q5_K: -> (d, dmin, scale levels, min levels, q [n, 256])."""
    n = x.shape[0]
    sub = x.reshape(n, -1, sub_len)
    scale, mn = (t.squeeze(-1) for t in _fit_affine(sub, nmax))
    d, dmin = _super_scale(scale, level_top), _super_scale(mn, level_top)
    best = None
    # Plain rounding of a sub-block's scale and min to levels is often not the best pair:
    # try both neighbours of each and re-round the weights for every pair.
    for sc in _neighbour_levels(scale, d, 0, level_top):
        for mc in _neighbour_levels(mn, dmin, 0, level_top):
            eff_scale, eff_min = (d * sc).unsqueeze(-1), (dmin * mc).unsqueeze(-1)
            q = ((sub + eff_min) * _safe_inv(eff_scale)).round().clamp(0, nmax)
            err = (eff_scale * q - eff_min - sub).square().sum(-1)
            best = _keep_better(best, err, sc, mc, q)
    _, sc, mc, q = best
    return d, dmin, sc.to(torch.uint8), mc.to(torch.uint8), q.to(torch.uint8).reshape(n, -1)


def _symmetric_k(x: torch.Tensor, nmax: int, level_lo: int):
    """Shared part of Q3_K/Q6_K (16 sub-blocks of 16): -> (d, signed scale levels,
    q [n, 256] shifted to 0..2*nmax-1)."""
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    scale = _fit_symmetric(sub, nmax).squeeze(-1)
    d = _super_scale(scale, -level_lo - 1, level_lo)
    best = None
    for sc in _neighbour_levels(scale, d, level_lo, -level_lo - 1):
        eff = (d * sc).unsqueeze(-1)
        q = (sub * _safe_inv(eff)).round().clamp(-nmax, nmax - 1)
        best = _keep_better(best, (eff * q - sub).square().sum(-1), sc, q)
    _, sc, q = best
    return d, sc.to(torch.int8), (q + nmax).to(torch.uint8).reshape(n, -1)


def _k_scale_bytes(sc: torch.Tensor, mc: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins -> the 12-byte Q4_K/Q5_K layout."""
    return torch.cat((
        (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
        (mc[:, :4] & 63) | ((mc[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0xF) | ((mc[:, 4:] & 0xF) << 4),
    ), dim=1)


def quant_q6_k(x: torch.Tensor) -> torch.Tensor:
    d, sc, q = _symmetric_k(x, 32, -128)
    q = q.reshape(-1, 2, 4, 32)  # (half, group, weight); groups 0,1 low nibbles, 2,3 high
    ql = ((q[:, :, 0:2] & 0xF) | ((q[:, :, 2:4] & 0xF) << 4)).reshape(-1, 128)
    qh = _pack(q >> 4, 2).reshape(-1, 64)
    return torch.cat((ql, qh, sc.view(torch.uint8), _f16_bytes(d)), dim=1)


def quant_q5_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, sc, mc, q = _affine_k(x, 32, 31, 63)
    q = q.reshape(-1, 4, 2, 32)  # (pair of sub-blocks, low/high nibble, weight)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    qh = _pack((q.reshape(-1, 8, 32) >> 4) & 1, 1)
    return torch.cat((_f16_bytes(d), _f16_bytes(dmin), _k_scale_bytes(sc, mc), qh, qs), dim=1)


def quant_q4_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, sc, mc, q = _affine_k(x, 32, 15, 63)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat((_f16_bytes(d), _f16_bytes(dmin), _k_scale_bytes(sc, mc), qs), dim=1)


def quant_q3_k(x: torch.Tensor) -> torch.Tensor:
    d, sc, q = _symmetric_k(x, 4, -32)
    hmask = _pack((q >> 2).reshape(-1, 8, 32), 1)
    qs = _pack((q & 3).reshape(-1, 2, 4, 32), 2).reshape(-1, 64)
    u = (sc.to(torch.int16) + 32).to(torch.uint8)  # 6-bit, offset by 32
    scales = torch.cat(((u[:, :8] & 0xF) | ((u[:, 8:] & 0xF) << 4),
                        _pack((u >> 4).reshape(-1, 4, 4), 2)), dim=1)
    return torch.cat((hmask, qs, scales, _f16_bytes(d)), dim=1)


def quant_q2_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, sc, mc, q = _affine_k(x, 16, 3, 15)
    qs = _pack(q.reshape(-1, 2, 4, 32), 2).reshape(-1, 64)
    return torch.cat((sc | (mc << 4), qs, _f16_bytes(d), _f16_bytes(dmin)), dim=1)


Quantizer = Callable[[torch.Tensor], torch.Tensor]

# types.py names each writable type's encoder; a name missing here fails at import
QUANTIZERS: Dict[str, Quantizer] = {n: globals()[t.quantizer] for n, t in QUANTIZED.items()
                                    if t.quantizer}


def quantize(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """Float [rows, cols] -> uint8 [rows, cols / block_len * type_size], on weight's device."""
    encode = QUANTIZERS.get(qtype)
    if encode is None:
        raise FormatUnsupported(f"Cannot quantize to GGML type '{qtype}'; supported: "
                                f"{', '.join(QUANTIZERS)}.")
    if weight.dim() != 2:
        raise FormatUnsupported(f"GGUF quantization takes a 2-D [rows, cols] weight, got shape "
                                f"{list(weight.shape)}. Flatten dims 1.. first.")
    rows, cols = weight.shape
    block_len, type_size = BLOCK_SIZES[qtype]
    if cols % block_len:
        raise FormatUnsupported(f"GGML {qtype} packs rows in blocks of {block_len} weights, but "
                                f"this weight has {cols} columns. Keep this layer in high "
                                f"precision or use a type with a block length dividing {cols}.")
    if not torch.isfinite(weight).all():
        raise FormatUnsupported(f"The weight [{rows}, {cols}] contains NaN or infinite values, "
                                f"which GGML {qtype} cannot store. Fix or exclude this layer.")
    out = torch.empty(rows, cols // block_len * type_size, dtype=torch.uint8, device=weight.device)
    step = max(1, _CHUNK_WEIGHTS // cols)
    for start in range(0, rows, step):
        chunk = weight[start:start + step].float().reshape(-1, block_len)
        out[start:start + step] = encode(chunk).reshape(-1, out.shape[1])
    return out
