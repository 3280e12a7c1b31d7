"""Live device and RAM figures for ComfyUI's compute device. Reads counters only: nothing
is allocated on the GPU and no model is loaded or moved."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Optional

import psutil
import torch

import comfy.model_management

log = logging.getLogger(__name__)

_LINUX_STATUS = "/proc/self/status"
_LINUX_CLEAR_REFS = "/proc/self/clear_refs"
_RESET_PEAK_RSS = "5"  # proc(5): writing 5 to clear_refs resets the peak RSS (VmHWM)


@dataclass
class GpuFigures:
    total: int
    free: int
    allocated: int  # by torch tensors
    reserved: int  # by torch's caching allocator
    peak_allocated: int  # since the last reset
    peak_reserved: int


@dataclass
class RamFigures:
    total: int
    available: int
    rss: int  # this process
    peak_rss: Optional[int]  # since the last reset where the OS allows one, else since start


@dataclass
class DeviceFigures:
    device: str  # "cuda:0", "cpu"
    name: str  # as ComfyUI names it
    gpu: Optional[GpuFigures]  # None on CPU-only (and unified-memory) machines
    ram: RamFigures


def _accelerator(device: torch.device):
    """torch.cuda / torch.xpu / ... when it keeps allocator statistics, else None."""
    if device.type in ("cpu", "mps"):
        return None
    module = getattr(torch, device.type, None)
    return module if hasattr(module, "max_memory_allocated") else None


def gpu_figures(device: torch.device) -> Optional[GpuFigures]:
    acc = _accelerator(device)
    if acc is None:
        return None
    mm = comfy.model_management
    return GpuFigures(total=mm.get_total_memory(device), free=mm.get_free_memory(device),
                      allocated=acc.memory_allocated(device), reserved=acc.memory_reserved(device),
                      peak_allocated=acc.max_memory_allocated(device),
                      peak_reserved=acc.max_memory_reserved(device))


def _peak_rss() -> Optional[int]:
    if sys.platform.startswith("linux"):
        try:
            with open(_LINUX_STATUS) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    info = psutil.Process().memory_info()
    return getattr(info, "peak_wset", None)  # Windows


def ram_figures() -> RamFigures:
    vm = psutil.virtual_memory()
    return RamFigures(total=vm.total, available=vm.available, rss=psutil.Process().memory_info().rss,
                      peak_rss=_peak_rss())


def device_figures() -> DeviceFigures:
    device = comfy.model_management.get_torch_device()
    return DeviceFigures(device=str(device), name=comfy.model_management.get_torch_device_name(device),
                         gpu=gpu_figures(device), ram=ram_figures())


def reset_peaks() -> None:
    """Start the peak counters (GPU allocator, process RSS on Linux) from now."""
    device = comfy.model_management.get_torch_device()
    acc = _accelerator(device)
    if acc is not None:
        acc.reset_peak_memory_stats(device)
    if sys.platform.startswith("linux"):
        try:
            with open(_LINUX_CLEAR_REFS, "w") as f:
                f.write(_RESET_PEAK_RSS)
        except OSError as exc:
            log.info("Could not reset the peak RSS counter (%s); it counts from process start.", exc)
