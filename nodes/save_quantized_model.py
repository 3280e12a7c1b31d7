"""Save Quantized Model: a quantized MODEL written into ComfyUI's diffusion model folder,
as a .gguf file (Load GGUF Model and other GGUF loaders read it) or, on ComfyUI versions
that load per-layer quantized checkpoints, in ComfyUI's own layout (.safetensors that stock
ComfyUI loads with its plain loaders)."""
from __future__ import annotations

import os
import time

import comfy.utils
import folder_paths

from ..backends.engine.errors import FormatUnsupported, QuantKitError
from ..backends.gguf.convert import ARCHITECTURES
from ..backends.gguf.export import describe, save_gguf
from ..backends.engine.native_export import native_state_dict
from .comfy_source_layers import stored_as_floats
from .model_paths import escapes
from .quantize_model import detect_family

# our family -> the GGUF architecture name files of that family carry
ARCH_BY_FAMILY = {recipe: arch for arch, recipe in ARCHITECTURES.items() if recipe != "generic"}


def architecture(model) -> str:
    """A known family's GGUF name ("flux", "aura", ...), else ComfyUI's config name."""
    return ARCH_BY_FAMILY.get(detect_family(model)) or type(model.model.model_config).__name__.lower()


def models_folder(kind: str) -> str:
    """models/<kind> (ComfyUI also lists legacy folders such as models/unet first)."""
    paths = folder_paths.get_folder_paths(kind)
    return next((p for p in paths if os.path.basename(os.path.normpath(p)) == kind), paths[0])


# the node's choice -> core's layer format (None: GGUF)
FILE_FORMATS = {"gguf": None, "comfy fp8 (float8_e4m3fn)": "float8_e4m3fn",
                "comfy int8 (int8_tensorwise)": "int8_tensorwise"}
# a CLIP's encoders saved beside the model, and the GGUF architecture each file names
ENCODER_ARCH = {"clip_l": "clip", "clip_g": "clip", "t5xxl": "t5", "clip_h": "clip", "pile_t5xl": "t5",
                "umt5xxl": "t5", "t5base": "t5", "umt5base": "t5", "mt5xl": "t5"}


def native_checkpoints_supported() -> bool:
    """ComfyUI loads per-layer `comfy_quant` checkpoints since 0.8 (0.3.75 does not)."""
    return hasattr(comfy.utils, "detect_layer_quantization")


def output_path(name: str, overwrite: bool, extension: str = ".gguf",
                kind: str = "diffusion_models") -> str:
    """The file for `name` inside models/<kind>; refuses names that leave it and existing
    files unless overwrite is set."""
    name = name.strip()
    if not name:
        raise QuantKitError("Give the file a name, e.g. 'quantkit/sdxl_Q8_0'.")
    parts = name.replace("\\", "/").split("/")
    if escapes(name):
        raise QuantKitError(f"'{name}' is not a name inside ComfyUI's models/{kind} folder: "
                            f"use a relative name without '..', e.g. 'quantkit/sdxl_Q8_0'.")
    if not name.endswith(extension):
        name += extension
    folder = os.path.realpath(models_folder(kind))
    path = os.path.realpath(os.path.join(folder, *parts[:-1], os.path.basename(name)))
    if os.path.commonpath([folder, path]) != folder:
        raise QuantKitError(f"'{name}' leads outside {folder}; choose a plain relative name.")
    if os.path.exists(path) and not overwrite:
        raise QuantKitError(f"{path} exists. Choose another name, or turn on 'overwrite'.")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


class SaveQuantizedModel:
    DESCRIPTION = ("Writes a quantized MODEL to models/diffusion_models: as a .gguf file (a "
                   "gguf:* format from Quantize Model or Load GGUF Model; the bytes as they are, "
                   "so loading it gives the same model), or on current ComfyUI in ComfyUI's own "
                   "fp8/int8 layout, which stock ComfyUI loads with Load Diffusion Model.")
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
        }, "optional": {
            "clip": ("CLIP", {"tooltip": "Also write this CLIP's encoders quantized with a gguf:* "
                              "format (Quantize Text Encoder or Load GGUF CLIP), one .gguf per "
                              "encoder in models/text_encoders: <filename>_t5xxl.gguf, ... "
                              "Load GGUF CLIP reads them."}),
            "file_format": (list(FILE_FORMATS), {"default": "gguf", "tooltip":
                            "gguf: the quantized bytes as they are (.gguf). comfy fp8 / int8: "
                            "ComfyUI's own per-layer layout (.safetensors; current ComfyUI only), "
                            "each layer re-quantized with one scale per tensor; loads without "
                            "QuantKit."}),
        }}

    def save(self, model, filename, overwrite=False, file_format="gguf", clip=None):
        if model.patches or (clip is not None and clip.patcher.patches):
            raise QuantKitError("This MODEL or CLIP carries patches (a LoRA) that the file cannot "
                                "hold. Connect Save Quantized Model before the LoRA loader.")
        native = FILE_FORMATS[file_format]
        if native is not None and not native_checkpoints_supported():
            raise FormatUnsupported(f"'{file_format}' needs a ComfyUI that loads per-layer "
                                    f"quantized checkpoints (0.8 or later); save as 'gguf' here.")
        if native is not None and clip is not None:
            raise QuantKitError("Text encoders are saved as gguf only: set 'file_format' to "
                                "'gguf', or disconnect the CLIP.")
        encoders = [] if clip is None else [e for e in ENCODER_ARCH
                                            if getattr(clip.cond_stage_model, e, None) is not None]
        # every name is checked before anything is written
        path = output_path(filename, overwrite, ".gguf" if native is None else ".safetensors")
        te_paths = {e: output_path(f"{filename}_{e}", overwrite, ".gguf", "text_encoders") for e in encoders}
        start = time.perf_counter()
        if native is None:
            arch = architecture(model)
            tensors = save_gguf(model.model.diffusion_model, path, arch, _name_of(path),
                                own_floats=stored_as_floats)
            lines = [f"wrote {path} ({_mib(path)}, architecture {arch}, {describe(tensors)})"]
        else:
            sd = native_state_dict(model.model.diffusion_model, native)
            _save_safetensors(sd, path)
            lines = [f"wrote {path} ({_mib(path)}, ComfyUI {native} layout, "
                     f"{sum(k.endswith('comfy_quant') for k in sd)} quantized layers)"]
        for encoder, te_path in te_paths.items():
            root = getattr(clip.cond_stage_model, encoder).transformer
            # an encoder the quantize node kept (SD3's CLIP-G) is written in its float type
            tensors = save_gguf(root, te_path, ENCODER_ARCH[encoder], _name_of(te_path),
                                require_quantized=False, own_floats=stored_as_floats)
            lines.append(f"wrote {te_path} ({_mib(te_path)}, {encoder}, {describe(tensors)})")
        lines.append(f"in {time.perf_counter() - start:.1f} s")
        return {"ui": {"text": ("\n".join(lines),)}}


def _name_of(path: str) -> dict:
    return {"general.name": os.path.splitext(os.path.basename(path))[0]}


def _mib(path: str) -> str:
    return f"{os.path.getsize(path) / 2**20:.1f} MiB"


def _save_safetensors(sd: dict, path: str) -> None:
    from safetensors.torch import save_file
    tmp = path + ".partial"
    try:
        save_file(sd, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
