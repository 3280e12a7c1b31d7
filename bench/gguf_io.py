"""Write a quantized diffusion model as a .gguf file (ComfyUI key layout, exact bytes of
the quantized layers) and time QuantKit's Load GGUF Model on it."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .measure import sync


def save_gguf(diffusion_model: torch.nn.Module, path: Path, arch: str, pack) -> int:
    """Quantized GGUF layers keep their blocks; everything else is stored as F32."""
    pack.gguf_export.save_gguf(diffusion_model, path, arch, {"general.name": path.stem})
    return path.stat().st_size


def time_load(env, path: Path, device) -> dict:
    """Seconds to read the file into a ComfyUI model (Load GGUF Model), then to move it to
    the run device (what the first sampling step waits for)."""
    start = time.perf_counter()
    patcher, _report = env.pack.load_gguf.load_gguf_model(str(path))
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    env.mm.load_models_gpu([patcher])
    sync(device)
    to_device_s = time.perf_counter() - start
    return {"patcher": patcher, "load_s": read_s, "to_device_s": to_device_s}
