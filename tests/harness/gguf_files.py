"""Write a quantized ComfyUI model's diffusion model as a .gguf file (tests, benchmark)."""
from __future__ import annotations

from pathlib import Path


def save_diffusion_model_gguf(patcher, path: Path, arch: str, layer_type=None) -> dict:
    from conftest import pack_module
    save_gguf = pack_module("backends.gguf_export").save_gguf
    return save_gguf(patcher.model.diffusion_model, path, arch, {"general.name": Path(path).stem})
