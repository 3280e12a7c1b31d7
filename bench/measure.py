"""Timing, memory and error measurements shared by the parts."""
from __future__ import annotations

import gc
import statistics
import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, device, warmup: int = 2, min_iters: int = 3, max_iters: int = 10,
               max_seconds: float = 3.0) -> dict:
    """Median seconds per call of fn() after `warmup` calls: CUDA events on a GPU, a wall
    clock on a CPU. Stops after max_iters calls, or max_seconds once min_iters are done."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    sync(device)
    times, host = [], []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < max_seconds):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            t = time.perf_counter()
            fn()
            host.append(time.perf_counter() - t)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    out = {"median_s": statistics.median(times), "min_s": min(times), "n": len(times)}
    if host:  # time for Python to queue the work: close to median_s means host-bound
        out["host_s"] = statistics.median(host)
    return out


def peak_during(fn, device) -> tuple:
    """(result, bytes allocated at the peak of fn() above what was allocated before); None
    for the bytes on a CPU."""
    if torch.device(device).type != "cuda":
        return fn(), None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    sync(device)
    return out, torch.cuda.max_memory_allocated() - before


def module_bytes(module: torch.nn.Module, device=None) -> int:
    """Bytes of the module's parameters and buffers (each storage once), optionally only
    those on `device`."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if device is not None and t.device.type != torch.device(device).type:
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
