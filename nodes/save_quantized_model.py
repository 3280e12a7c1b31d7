"""Save Quantized Model: a GGUF-quantized MODEL written as a .gguf file into ComfyUI's
diffusion model folder, readable by Load GGUF Model and other GGUF loaders."""
from __future__ import annotations

import os
import time

import folder_paths

from ..backends.errors import QuantKitError
from ..backends.gguf_convert import ARCHITECTURES
from ..backends.gguf_export import describe, save_gguf
from .quantize_model import detect_family

# ComfyUI model configs whose GGUF architecture name is not their family's
ARCH_BY_CONFIG = {"Flux": "flux", "FluxSchnell": "flux", "AuraFlow": "aura"}
ARCH_BY_FAMILY = {recipe: arch for arch, recipe in ARCHITECTURES.items() if recipe != "generic"}


def architecture(model) -> str:
    config = type(model.model.model_config).__name__
    return ARCH_BY_CONFIG.get(config) or ARCH_BY_FAMILY.get(detect_family(model)) or config.lower()


def diffusion_models_folder() -> str:
    """models/diffusion_models (ComfyUI also lists the legacy models/unet first)."""
    paths = folder_paths.get_folder_paths("diffusion_models")
    return next((p for p in paths if os.path.basename(os.path.normpath(p)) == "diffusion_models"), paths[0])


def output_path(name: str, overwrite: bool) -> str:
    """The file for `name` inside the first diffusion model folder; refuses names that leave
    it and existing files unless overwrite is set."""
    name = name.strip()
    if not name:
        raise QuantKitError("Give the file a name, e.g. 'quantkit/sdxl_Q8_0'.")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or ".." in parts or (len(name) > 1 and name[1] == ":"):
        raise QuantKitError(f"'{name}' is not a name inside ComfyUI's diffusion model folder: "
                            f"use a relative name without '..', e.g. 'quantkit/sdxl_Q8_0'.")
    if not name.endswith(".gguf"):
        name += ".gguf"
    folder = os.path.realpath(diffusion_models_folder())
    path = os.path.realpath(os.path.join(folder, *parts[:-1], os.path.basename(name)))
    if os.path.commonpath([folder, path]) != folder:
        raise QuantKitError(f"'{name}' leads outside {folder}; choose a plain relative name.")
    if os.path.exists(path) and not overwrite:
        raise QuantKitError(f"{path} exists. Choose another name, or turn on 'overwrite'.")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


class SaveQuantizedModel:
    DESCRIPTION = ("Writes a MODEL quantized with a gguf:* format (Quantize Model) or read by "
                   "Load GGUF Model to a .gguf file in models/diffusion_models, where Load GGUF "
                   "Model and other GGUF loaders find it. The quantized bytes are written as "
                   "they are: loading the file gives the same model.")
    CATEGORY = "QuantKit"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A model quantized with a gguf:* format."}),
            "filename": ("STRING", {"default": "quantkit/model", "tooltip":
                         "Name inside models/diffusion_models ('.gguf' is added); subfolders "
                         "allowed, '..' and absolute paths are not."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip":
                          "Replace a file of that name. Off: an existing file is an error."}),
        }}

    def save(self, model, filename, overwrite=False):
        if model.patches:
            raise QuantKitError("This MODEL carries patches (a LoRA) that a .gguf file cannot "
                                "hold. Connect Save Quantized Model before the LoRA loader.")
        path = output_path(filename, overwrite)
        start = time.perf_counter()
        arch = architecture(model)
        tensors = save_gguf(model.model.diffusion_model, path, arch,
                            {"general.name": os.path.splitext(os.path.basename(path))[0]})
        text = (f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, architecture {arch}) "
                f"in {time.perf_counter() - start:.1f} s: {describe(tensors)}")
        return {"ui": {"text": (text,)}}
