"""Triton kernels for 8-bit linear layers on NVIDIA GPUs (imported only there).

- `quantize_rows`: one pass per row: absolute maximum, scale, rounded int8 or saturated fp8.
- `int8_weight_matmul`: y = x @ (q * s)^T + b in one kernel, for int8 weights q with a
  per-output-channel scale s; x is either int8 with per-row scales (W8A8: int8 tensor
  cores, int32 accumulation) or bf16/fp16 (weight-only: the weight is widened in registers,
  never written out). Scales and bias are applied in the epilogue.

Tile sizes are picked from the shape by `_tiles` (measured on an H200, see
bench/linear_kernels.py) rather than autotuned, so a first call costs no tuning runs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_LAUNCHERS: dict = {}


def _launch(kernel, grid, args: tuple, constexprs: dict, num_warps: int, num_stages: int = 3):
    """kernel[grid](*args, **constexprs), minus Triton's per-call argument binding (about
    15 us a launch, which decides eager speed on hosts that launch slowly): the compiled
    kernel is kept under a key holding everything Triton specialises on (tensor dtypes and
    devices, 16-byte alignment, integers that are 1 or multiples of 16) and launched directly.
    Any change in Triton's launcher falls back to the ordinary call."""
    key = (kernel, num_warps, num_stages, tuple(constexprs.items()),
           tuple(_spec_of(a) for a in args))
    compiled = _LAUNCHERS.get(key)
    if compiled is not None:
        try:
            stream = torch.cuda.current_stream(args[0].device).cuda_stream
            every = (*args, *constexprs.values())
            hooks = _knobs().runtime
            compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, 1, stream, compiled.function,
                         compiled.packed_metadata, compiled.launch_metadata(grid, stream, *every),
                         hooks.launch_enter_hook, hooks.launch_exit_hook, *every)
            return
        except Exception:
            _LAUNCHERS[key] = None  # launcher changed shape: ordinary calls from now on
    compiled = kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
    if key not in _LAUNCHERS and _direct_ok(compiled):
        _LAUNCHERS[key] = compiled


def _spec_of(a):
    if isinstance(a, torch.Tensor):  # a compiled kernel belongs to one device
        return a.dtype, a.device.index, a.data_ptr() % 16 == 0
    if isinstance(a, int):
        return a == 1, a % 16 == 0, abs(a) >= 2**31
    return type(a)


def _direct_ok(compiled) -> bool:
    return (_knobs() is not None and hasattr(compiled, "run")
            and hasattr(compiled, "packed_metadata") and hasattr(compiled, "launch_metadata"))


def _knobs():
    try:
        from triton import knobs  # Triton >= 3.4
    except ImportError:
        return None
    return knobs


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q,
                          QMAX: tl.constexpr, TO_INT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    peak = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        peak = tl.maximum(peak, tl.abs(v))
    scale = tl.maximum(tl.max(peak, axis=0) / QMAX, 1e-12)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < K
        v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32) / scale
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        if TO_INT:
            v = libdevice.rint(v)
        tl.store(q_row + offs, v.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_rows(x2: torch.Tensor, qdtype: torch.dtype, qmax: float):
    """[M, K] float -> ([M, K] qdtype, [M, 1] float32 scales), scale = row absmax / qmax."""
    m, k = x2.shape
    q = torch.empty((m, k), dtype=qdtype, device=x2.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x2.device)
    if m:
        block = min(2048, triton.next_power_of_2(k))
        _launch(_quantize_rows_kernel, (m,), (x2, q, s, k, x2.stride(0), q.stride(0)),
                {"QMAX": qmax, "TO_INT": not qdtype.is_floating_point, "BLOCK": block},
                num_warps=4 if block <= 1024 else 8)
    return q, s


@triton.jit
def _int8_weight_matmul_kernel(a_ptr, w_ptr, c_ptr, ws_ptr, as_ptr, bias_ptr, M, N, K,
                               stride_am, stride_wn, stride_cm,
                               A_INT8: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                               GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    rows_a = tl.where(offs_m < M, offs_m, 0).to(tl.int64)  # clamped: loads stay in bounds
    rows_w = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + rows_w[None, :] * stride_wn + offs_k[:, None]  # [BK, BN] view of W^T

    acc = tl.zeros((BM, BN), dtype=tl.int32 if A_INT8 else tl.float32)
    for k0 in range(0, tl.cdiv(K, BK)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            left = K - k0 * BK
            a = tl.load(a_ptrs, mask=offs_k[None, :] < left, other=0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < left, other=0)
        if A_INT8:
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, w.to(a.dtype), acc)
        a_ptrs += BK
        w_ptrs += BK

    out = acc.to(tl.float32) * tl.load(ws_ptr + rows_w)[None, :]
    if A_INT8:
        out = out * tl.load(as_ptr + rows_a)[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows_w).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# (BM, BN, BK, warps, stages), by activation kind and row count (H200 sweep, 2026-12-01).
_TILES = {
    "int8": ((256, (64, 64, 256, 4, 3)), (None, (128, 128, 64, 4, 4))),
    "half": ((256, (64, 64, 128, 4, 3)), (None, (128, 128, 64, 8, 3))),
}


def _tiles(kind: str, m: int):
    for max_m, tiles in _TILES[kind]:
        if max_m is None or m <= max_m:
            return tiles
    raise AssertionError("unreachable")


def int8_weight_matmul(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                       a_scale, bias, out_dtype: torch.dtype, tiles=None) -> torch.Tensor:
    """a: [M, K] int8 (with a_scale [M, 1] float32) or bf16/fp16 (a_scale None);
    w: [N, K] int8; w_scale: [N] float32; bias: [N] or None. -> [M, N] out_dtype."""
    m, k = a.shape
    n = w.shape[0]
    a_int8 = a.dtype == torch.int8
    bm, bn, bk, warps, stages = tiles or _tiles("int8" if a_int8 else "half", m)
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0:
        return c
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _launch(_int8_weight_matmul_kernel, grid,
            (a, w, c, w_scale, a_scale if a_int8 else w_scale,
             bias if bias is not None else w_scale, m, n, k, a.stride(0), w.stride(0), c.stride(0)),
            {"A_INT8": a_int8, "HAS_BIAS": bias is not None, "EVEN_K": k % bk == 0,
             "BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
    return c


@triton.jit
def _dequantize_rows_kernel(q_ptr, s_ptr, out_ptr, K, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < K
    v = tl.load(q_ptr + row * K + col, mask=mask).to(tl.float32) * tl.load(s_ptr + row)
    tl.store(out_ptr + row * K + col, v.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] int8/fp8 times a per-row float32 scale -> [N, K] dtype, in one kernel."""
    n, k = q.shape
    out = torch.empty((n, k), dtype=dtype, device=q.device)
    if q.numel():
        block = min(4096, triton.next_power_of_2(k))
        _launch(_dequantize_rows_kernel, (n, triton.cdiv(k, block)), (q, scale, out, k),
                {"BLOCK": block}, num_warps=4)
    return out
