"""Write a quantized diffusion model as a .gguf file (ComfyUI key layout, exact bytes of
the quantized layers) and time QuantKit's Load GGUF Model on it."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .measure import sync


def save_gguf(diffusion_model: torch.nn.Module, path: Path, arch: str, pack) -> int:
    """Quantized GGUF layers keep their blocks; everything else is stored as F32."""
    layer_type = pack.modules.QuantizedLayer
    tensors = {}
    quantized = {n for n, m in diffusion_model.named_modules() if isinstance(m, layer_type)}
    for name, module in diffusion_model.named_modules():
        if name in quantized:
            if module.spec.backend != "gguf":
                raise ValueError(f"{name} is {module.spec.id}: only gguf layers can be saved as GGUF")
            tensors[f"{name}.weight"] = (module.spec.name, module.weight.detach().cpu(),
                                         tuple(module.weight_shape))
            if module.bias is not None:
                tensors[f"{name}.bias"] = ("F32", module.bias.detach().float().cpu(), tuple(module.bias.shape))
            continue
        if any(name.startswith(q + ".") for q in quantized):
            continue
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for pname, p in own:
            key = f"{name}.{pname}" if name else pname
            tensors[key] = ("F32", p.detach().float().cpu().contiguous(), tuple(p.shape))
    pack.gguf_file.write_gguf(path, tensors, {"general.name": path.stem}, arch=arch)
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
