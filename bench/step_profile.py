"""Where a step's time goes: torch.profiler over a few calls, kernel time summed by kind.

On a GPU the kernels' device time is summed; `gpu busy` below the step's wall time means
the GPU waited on Python queueing launches (host-bound). On a CPU, operators' own time.
"""
from __future__ import annotations

import re
import time

import torch

from .measure import sync

# first match wins: convolutions before GEMMs (cuDNN names its convolutions "implicit_gemm")
KINDS = (
    ("host-to-device copies", r"memcpy htod"),  # partial loading streams weights in
    ("quantize/decode", r"_quantize_rows|_decode_kernel|_group_kernel|_dequantize_rows|dequant|quantize_per"),
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("convolution", r"conv|fprop|dgrad|implicit|winograd"),
    ("matmul", r"gemm|gemv|cutlass|xmma|nvjet|matmul|_int_mm|scaled_mm|addmm|aten::mm|aten::bmm|sm90_|sm80_"),
    ("norm", r"norm"),
)
OTHER = "elementwise/copies"
CALLS = 3


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return OTHER


def where_time_goes(fn, device) -> dict:
    """Milliseconds per call: wall time, time the device was busy, and that time by kind."""
    cuda = torch.device(device).type == "cuda"
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    fn()
    sync(device)
    start = time.perf_counter()
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(CALLS):
            fn()
        sync(device)
    wall = (time.perf_counter() - start) / CALLS
    kinds: dict = {}
    for event in prof.key_averages():
        us = (getattr(event, "self_device_time_total", 0) if cuda
              else getattr(event, "self_cpu_time_total", 0))
        if us:
            kind = kind_of(event.key)
            kinds[kind] = kinds.get(kind, 0.0) + us / 1000 / CALLS
    return {"wall_ms": wall * 1000, "busy_ms": sum(kinds.values()),
            "kinds_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1]))}
