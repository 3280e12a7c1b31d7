"""Load GGUF Model: a .gguf diffusion model straight into quantized layers (no float copy)."""
from __future__ import annotations

import time

import torch

import comfy.sd
import folder_paths

from ..backends.kernels.decode_groups import link_decode_groups
from ..backends.engine.errors import FormatUnsupported, MalformedFile
from ..backends.gguf.dequant import dequantize
from ..backends.gguf.file import FLOAT_TYPES, read_gguf
from ..backends.engine.modules import make_quantized
from ..backends.engine.registry import get_format
from .comfy_layers import LAYER_CLASSES
from .comfy_patcher import (classic_patcher_kwargs, new_quantized_patcher, set_reload_recipe,
                            settle_stored_dtypes)
from .gguf_loading_ops import gguf_loading_ops, lazy_layers, placeholder
from .gguf_report import file_report
from .model_paths import model_file

GGUF_FOLDER = "quantkit_gguf"


def register_gguf_folder() -> None:
    """.gguf files are listed from the diffusion model folders (and their extra paths)."""
    if GGUF_FOLDER not in folder_paths.folder_names_and_paths:
        paths = folder_paths.folder_names_and_paths["diffusion_models"][0]  # the live list
        folder_paths.folder_names_and_paths[GGUF_FOLDER] = (paths, {".gguf"})


def build_state_dict(contents, placeholder_dtype=torch.bfloat16, float_names=()):
    """(state dict, id of each value -> its GGUFTensor). Float tensors as they are; quantized
    ones as meta placeholders of their float shape (what ComfyUI's model detection reads),
    except those named in float_names (embeddings), decoded to fp16."""
    sd, sources = {}, {}
    for name, t in contents.tensors.items():
        if t.qtype in FLOAT_TYPES:
            value = t.data
        elif name in float_names:
            value = dequantize(t.data, t.qtype, t.shape, torch.float16)
        else:
            value = placeholder(t.shape, placeholder_dtype)
        sd[name] = value
        sources[id(value)] = t
    return sd, sources


def load_gguf_model(path: str):
    start = time.perf_counter()
    contents = read_gguf(path)
    sd, sources = build_state_dict(contents)
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": gguf_loading_ops()},
                                                       **classic_patcher_kwargs(comfy.sd.load_diffusion_model_state_dict))
    if patcher is None:
        raise MalformedFile(f"{path}: ComfyUI does not recognise this model's architecture "
                            f"(GGUF architecture '{contents.architecture}'). Load GGUF Model reads "
                            f"diffusion models in ComfyUI's own key layout (as ComfyUI-GGUF's converter writes).")
    root, find = patcher.model.diffusion_model, source_of(sources, _tensor_lookup(contents))
    swap_in_quantized(root, find, path)
    settle_stored_dtypes(patcher.model)
    report = file_report(root, find, path, "diffusion model (GGUF file)")
    report.seconds = time.perf_counter() - start
    patcher.model.quantkit_reports = (report,)
    quantized = new_quantized_patcher(patcher, patcher.model)
    set_reload_recipe(quantized, reloaded_gguf_model, (path,))
    return quantized, report


def reloaded_gguf_model(path: str, disable_dynamic=False):
    """ComfyUI's reload recipe for a Load GGUF model: the file read again."""
    return load_gguf_model(path)[0]


def source_of(sources, by_name):
    """module -> the GGUFTensor its weight came from: by identity, else by key."""
    def find(module):
        tensor = sources.get(id(module.gguf_source))
        return tensor if tensor is not None or module.gguf_weight is None else by_name(module.gguf_weight)
    return find


def swap_in_quantized(root, find, path: str) -> None:
    """Replaces root's lazy layers holding a quantized weight by quantized layers over the
    file's bytes."""
    for name, module in lazy_layers(root):
        tensor = find(module)
        adapter, spec = get_format(f"gguf:{tensor.qtype}")
        problem = adapter.supports_shape(spec, torch.Size(tensor.shape))
        if problem:
            raise FormatUnsupported(f"{path}: tensor {tensor.name} ({tensor.qtype}, shape "
                                    f"{tensor.shape}) cannot be used: {problem}.")
        bias = module.bias.detach() if module.bias is not None else None
        new = make_quantized(module, adapter, spec, {"weight": tensor.data}, bias,
                             layer_cls=LAYER_CLASSES, shape=tensor.shape)
        _replace(root, name, new)
    link_decode_groups(root)


def _tensor_lookup(contents):
    """Model keys may have lost a checkpoint prefix; match on the longest suffix."""
    names = contents.tensors

    def find(key):
        if key in names:
            return names[key]
        for name, t in names.items():
            if name.endswith("." + key):
                return t
        raise MalformedFile(f"{contents.path}: no tensor for layer weight {key}.")
    return find


def _replace(root, name, child):
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, child)


class LoadGGUF:
    DESCRIPTION = ("Loads a .gguf diffusion model (SD1.5, SDXL, SD3, PixArt, ...) directly into "
                   "quantized layers: the file's bytes are what sits in memory. Works with LoRA "
                   "and ComfyUI's low-VRAM loading.")
    CATEGORY = "QuantKit"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The diffusion model, quantized as stored in the file.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        register_gguf_folder()
        return {"required": {"gguf_name": (folder_paths.get_filename_list(GGUF_FOLDER), {
            "tooltip": "A .gguf file from models/diffusion_models (or models/unet)."})}}

    def load(self, gguf_name):
        path = model_file(GGUF_FOLDER, gguf_name)
        model, report = load_gguf_model(path)
        return {"ui": {"text": (report.summary(),)}, "result": (model,)}
