"""Write a quantized ComfyUI model's diffusion model as a .gguf file (for tests and the
benchmark's load-time figure): quantized layers keep their exact bytes."""
from __future__ import annotations

from pathlib import Path

import torch


def save_diffusion_model_gguf(patcher, path: Path, arch: str, layer_type) -> dict:
    from conftest import pack_module
    write_gguf = pack_module("backends.gguf_file").write_gguf
    root = patcher.model.diffusion_model
    tensors = {}
    quantized = {n for n, m in root.named_modules() if isinstance(m, layer_type)}
    for name, module in root.named_modules():
        if name in quantized:
            if module.spec.backend != "gguf":
                raise ValueError(f"{name} is {module.spec.id}: only gguf layers can be saved as GGUF")
            tensors[f"{name}.weight"] = (module.spec.name, module.weight.detach(), tuple(module.weight_shape))
            if module.bias is not None:
                tensors[f"{name}.bias"] = ("F32", module.bias.detach().float(), tuple(module.bias.shape))
            continue
        if any(name.startswith(q + ".") for q in quantized):
            continue
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for pname, p in own:
            key = f"{name}.{pname}" if name else pname
            tensors[key] = ("F32", p.detach().float().contiguous(), tuple(p.shape))
    write_gguf(path, tensors, {"general.name": path.stem}, arch=arch)
    return tensors
