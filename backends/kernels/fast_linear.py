"""How a quantized linear layer computes on the device at hand: one place that picks the kernel.

Paths, most specific first (every one computes the same y = x (q*s)^T + b up to rounding):
- NVIDIA GPU with Triton, bf16/fp16 activations: `triton:w8a8` (int8 activations quantized
  per row by one kernel, int8 tensor cores, scales and bias in the epilogue) or
  `triton:w8a16` (weight-only: int8 widened in registers, never written out as bf16);
- fp8 row-wise on compute capability >= 8.9: `scaled_mm:fp8` (one quantize kernel, then
  torch._scaled_mm with both scales and the bias fused);
- CPU: `cpu:int_mm` (W8A8 through torch._int_mm, several times faster than fp32 on x86);
- anywhere else: `dequant+matmul` (the float weight for the call, then an ordinary matmul).
GGUF block formats decode their weight for each call: on NVIDIA GPUs in one Triton kernel
(`triton:gguf-decode`, see `decode_gguf_blocks`), elsewhere with gguf_dequant's torch ops.
Under torch.compile (ComfyUI's TorchCompileModel) every path is written in plain torch ops
(torch._int_mm, torch._scaled_mm), which inductor fuses with the layers around them; opaque
custom ops around the Triton kernels measured 2-5x slower there (H200, 2026-12-01).
`KERNELS` counts the eager calls per path, for the benchmark's "which kernel ran" column.
"""
from __future__ import annotations

import importlib.util
import logging
from collections import Counter
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger("quantkit")
KERNELS: Counter = Counter()
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
# Below this many rows W8A8 loses: the matrix product is too small to pay for quantizing
# the activations, so weight-only kernels are used (they also keep the activations exact).
MIN_ROWS_DYNAMIC = 16
# Up to this many rows the product is bound by reading the weight, and the weight-only
# kernel (which reads int8) wins; above it, one dequantize kernel and cuBLAS are faster.
MAX_ROWS_WEIGHT_ONLY_KERNEL = 256
_HALF = (torch.bfloat16, torch.float16)


# Plain module state (no caches) so that torch.compile traces through. _TRITON turns False
# for good if a Triton kernel cannot be built here (no C compiler, an unsupported GPU).
_TRITON = importlib.util.find_spec("triton") is not None
_CAPABILITY: dict = {}  # device index -> (major, minor), filled on first use
TRITON_MIN_CAPABILITY = (8, 0)  # int8 tensor-core products in Triton: Ampere and newer


def _kernels():
    from . import triton_8bit as triton_kernels  # imports triton: only ever reached on a CUDA device
    return triton_kernels


def _capability(device: torch.device) -> tuple:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


def fp8_matmul_supported(device: torch.device) -> bool:
    return device.type == "cuda" and _capability(device) >= (8, 9)


def _gguf_kernels():
    from . import triton_gguf
    return triton_gguf


def triton_ok(t: torch.Tensor) -> bool:
    return _TRITON and t.is_cuda and _capability(t.device) >= TRITON_MIN_CAPABILITY


def _use_triton(x2: torch.Tensor, q: torch.Tensor) -> bool:
    return (x2.dtype in _HALF and x2.stride(-1) == 1 and q.is_contiguous()
            and x2.shape[1] % 16 == 0 and triton_ok(x2))


def triton_failed(exc: Exception) -> None:
    """Stops using Triton in this process, once, saying why (the plain torch paths compute
    the same results, more slowly). Out-of-memory is not a Triton problem: re-raised."""
    global _TRITON
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        raise exc
    _TRITON = False
    log.warning("QuantKit: Triton kernels are unavailable here (%s: %s); 8-bit and GGUF layers use "
                "plain torch kernels instead (slower). Installing a C compiler and a Triton "
                "that matches torch enables them.", type(exc).__name__, str(exc)[:300])


# -- reference math (any device), also the compiled-graph fallback -----------------------------
def quantize_rows_reference(x2: torch.Tensor, qdtype: torch.dtype, qmax: float):
    """([M, K] qdtype, [M, 1] float32 scale): scale = row absmax / qmax, values rounded to
    nearest (int8) or cast (fp8). |x / scale| <= qmax by construction, so no clamp pass;
    max(amax, -amin) needs no temporary the size of x (on a CPU, large temporaries cost
    more in page faults than the arithmetic)."""
    peak = torch.maximum(x2.amax(dim=1, keepdim=True), x2.amin(dim=1, keepdim=True).neg())
    scale = (peak.float() / qmax).clamp_(min=1e-12)
    v = x2.div(scale) if x2.dtype == torch.float32 else x2.float().div_(scale)
    if not qdtype.is_floating_point:
        v.round_()
    return v.to(qdtype), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if q.dim() == 2 and q.is_contiguous() and not torch.compiler.is_compiling() and triton_ok(q):
        try:
            return _kernels().dequantize_rows(q, scale.float().contiguous(), dtype)
        except Exception as exc:
            triton_failed(exc)
    return (q.to(torch.float32) * scale.float()[:, None]).to(dtype)


def _dequant_matmul(x2, q, scale, bias):
    KERNELS["dequant+matmul"] += 1
    return F.linear(x2, dequantize_rows(q, scale, x2.dtype), bias)


def decode_gguf_blocks(raw: torch.Tensor, qtype: str, n_weights: int,
                       dtype: torch.dtype) -> Optional[torch.Tensor]:
    """GGML blocks decoded by one Triton kernel, or None where the torch decoders must do
    it (CPU, under torch.compile, which fuses those, an unknown type or no Triton)."""
    if (raw.is_cuda and not torch.compiler.is_compiling() and raw.is_contiguous()
            and dtype in (*_HALF, torch.float32) and triton_ok(raw)):
        try:
            kernels = _gguf_kernels()
            if qtype in kernels.TYPES:
                y = kernels.decode(raw, qtype, n_weights, dtype)
                KERNELS["triton:gguf-decode"] += 1
                return y
        except Exception as exc:
            triton_failed(exc)
    return None


# -- int8 weights -----------------------------------------------------------------------------
def int8_linear(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor], dynamic: bool) -> torch.Tensor:
    """x2: [M, K]; q: [N, K] int8; scale: [N] float32. dynamic: quantize the activations to
    int8 per row (W8A8) where that is faster; otherwise activations stay as they are."""
    if torch.compiler.is_compiling():
        return _int8_for_inductor(x2, q, scale, bias, dynamic and x2.shape[0] >= MIN_ROWS_DYNAMIC)
    if _use_triton(x2, q):
        rows = x2.shape[0]
        bias = None if bias is None else bias.contiguous()
        scale = scale if scale.dtype == torch.float32 else scale.float()
        if dynamic and rows >= MIN_ROWS_DYNAMIC:
            return _w8a8_eager(x2, q, scale, bias)
        if rows <= MAX_ROWS_WEIGHT_ONLY_KERNEL:
            return _w8a16_eager(x2, q, scale, bias)
    if dynamic and x2.device.type == "cpu":
        return _cpu_int_mm(x2, q, scale, bias)
    return _dequant_matmul(x2, q, scale, bias)


def _w8a8_eager(x2, q, scale, bias):
    try:
        k = _kernels()
        xq, xs = k.quantize_rows(x2, torch.int8, INT8_MAX)
        y = k.int8_weight_matmul(xq, q, scale, xs, bias, x2.dtype)
    except Exception as exc:
        triton_failed(exc)
        return _dequant_matmul(x2, q, scale, bias)
    KERNELS["triton:w8a8"] += 1
    return y


def _w8a16_eager(x2, q, scale, bias):
    try:
        y = _kernels().int8_weight_matmul(x2, q, scale, None, bias, x2.dtype)
    except Exception as exc:
        triton_failed(exc)
        return _dequant_matmul(x2, q, scale, bias)
    KERNELS["triton:w8a16"] += 1
    return y


# Rows per block of the CPU W8A8 path: its temporaries stay near 1 MB and are reused, which
# made a full-size SD1.5 projection 2-5x faster than one pass over all rows (2-core x86).
CPU_BLOCK_ELEMENTS = 1 << 18


def _cpu_int_mm(x2, q, scale, bias):
    KERNELS["cpu:int_mm"] += 1
    m, n = x2.shape[0], q.shape[0]
    rows = max(64, CPU_BLOCK_ELEMENTS // max(x2.shape[1], n))
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    qt, ws = q.t(), scale.float()
    b = None if bias is None else bias.float()
    for r0 in range(0, m, rows):
        xq, xs = quantize_rows_reference(x2[r0:r0 + rows], torch.int8, INT8_MAX)
        y = torch._int_mm(xq, qt).float().mul_(xs).mul_(ws)
        if b is not None:
            y.add_(b)
        out[r0:r0 + rows].copy_(y)
    return out


# -- fp8 weights ------------------------------------------------------------------------------
def fp8_linear(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
               bias: Optional[torch.Tensor], dynamic: bool) -> torch.Tensor:
    """q: [N, K] float8_e4m3fn with per-row scale. dynamic: row-wise fp8 activations through
    torch._scaled_mm (needs compute capability >= 8.9); otherwise weight-only."""
    if (dynamic and fp8_matmul_supported(x2.device) and x2.shape[0] >= MIN_ROWS_DYNAMIC
            and x2.shape[1] % 16 == 0 and q.shape[0] % 16 == 0):
        if torch.compiler.is_compiling():
            return _fp8_for_inductor(x2, q, scale, bias)
        return _fp8_rowwise_eager(x2, q, scale, bias)
    return _dequant_matmul(x2, q, scale, bias)


def _fp8_rowwise_eager(x2, q, scale, bias):
    KERNELS["scaled_mm:fp8"] += 1
    xq = None
    if x2.dtype in _HALF and x2.stride(-1) == 1 and triton_ok(x2):
        try:
            xq, xs = _kernels().quantize_rows(x2, FP8, FP8_MAX)
        except Exception as exc:
            triton_failed(exc)
    if xq is None:
        xq, xs = quantize_rows_reference(x2, FP8, FP8_MAX)
    # row-wise scaling writes bf16 only; the bias is fused when it is bf16 as well
    fused_bias = bias if bias is not None and bias.dtype == torch.bfloat16 else None
    y = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale.float().view(1, -1),
                         bias=fused_bias, out_dtype=torch.bfloat16)
    if bias is not None and fused_bias is None:
        y = y + bias.to(y.dtype)
    return y.to(x2.dtype)


# -- plain torch ops for inductor to fuse (quantize into the producer, scales into the product)
def _int8_for_inductor(x2, q, scale, bias, dynamic):
    if not dynamic:
        return F.linear(x2, (q.to(x2.dtype) * scale.to(x2.dtype)[:, None]), bias)
    xq, xs = quantize_rows_reference(x2, torch.int8, INT8_MAX)
    y = torch._int_mm(xq, q.t()).float() * xs * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x2.dtype)


def _fp8_for_inductor(x2, q, scale, bias):
    xq, xs = quantize_rows_reference(x2, FP8, FP8_MAX)
    y = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale.float().view(1, -1),
                         bias=bias if bias is not None and bias.dtype == torch.bfloat16 else None,
                         out_dtype=torch.bfloat16)
    if bias is not None and bias.dtype != torch.bfloat16:
        y = y + bias.to(y.dtype)
    return y.to(x2.dtype)
