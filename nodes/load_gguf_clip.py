"""Load GGUF CLIP: text encoders from .gguf files (and .safetensors beside them) straight
into quantized layers, as one CLIP for the core CLIP Text Encode nodes."""
from __future__ import annotations

import dataclasses
import time

import torch

import comfy.model_management
import comfy.sd
import folder_paths

from ..backends.engine.errors import MalformedFile
from ..backends.gguf.file import read_gguf
from ..backends.gguf.names import EMBEDDING_NAMES, is_llama_cpp_t5, rename_llama_cpp_t5
from ..backends.engine.safetensors_file import read_safetensors
from .comfy_patcher import new_quantized_patcher, set_reload_recipe, settle_stored_dtypes
from .gguf_loading_ops import gguf_loading_ops
from .gguf_report import file_report
from .load_gguf import build_state_dict, source_of, swap_in_quantized
from .model_paths import model_file

TE_FOLDER = "quantkit_gguf_text_encoders"
NONE = "none"
# the node's choice -> ComfyUI's CLIPType (which encoders a combination makes)
CLIP_TYPES = {"stable_diffusion": "STABLE_DIFFUSION", "sdxl": "STABLE_DIFFUSION", "sd3": "SD3",
              "pixart": "PIXART", "flux": "FLUX"}


def register_text_encoder_folder() -> None:
    if TE_FOLDER not in folder_paths.folder_names_and_paths:
        paths = folder_paths.folder_names_and_paths["text_encoders"][0]  # the live list
        folder_paths.folder_names_and_paths[TE_FOLDER] = (paths, {".gguf", ".safetensors"})


def _state_dict(path: str, sources: dict) -> dict:
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if not path.endswith(".gguf"):
        raise MalformedFile(f"{path}: Load GGUF CLIP reads .gguf and .safetensors files only.")
    contents = read_gguf(path)
    if is_llama_cpp_t5(contents.tensors):
        names = rename_llama_cpp_t5(contents.tensors, path)
        tensors = {names[k]: dataclasses.replace(t, name=names[k])
                   for k, t in contents.tensors.items() if k in names}
        contents = dataclasses.replace(contents, tensors=tensors)
    embeddings = {n for n in contents.tensors if EMBEDDING_NAMES.search(n)}
    sd, found = build_state_dict(contents, torch.float16, embeddings)
    sources.update(found)
    return sd


def load_gguf_clip(paths, clip_type: str):
    start = time.perf_counter()
    sources: dict = {}
    sds = [_state_dict(p, sources) for p in paths]
    options = {"custom_operations": gguf_loading_ops(),
               "initial_device": comfy.model_management.text_encoder_offload_device()}
    clip = comfy.sd.load_text_encoder_state_dicts(
        sds, clip_type=getattr(comfy.sd.CLIPType, CLIP_TYPES[clip_type]), model_options=options)

    def by_name(key):
        raise MalformedFile(f"{', '.join(paths)}: no tensor for text-encoder weight {key}.")

    root, find, where = clip.cond_stage_model, source_of(sources, by_name), ", ".join(paths)
    swap_in_quantized(root, find, where)
    settle_stored_dtypes(root)
    report = file_report(root, find, where, "text encoders (GGUF file)")
    report.seconds = time.perf_counter() - start
    root.quantkit_reports = (report,)
    clip.patcher = new_quantized_patcher(clip.patcher, clip.cond_stage_model)
    set_reload_recipe(clip.patcher, reloaded_gguf_clip_patcher, (tuple(paths), clip_type))
    return clip, report


def reloaded_gguf_clip_patcher(paths, clip_type: str, disable_dynamic=False):
    """ComfyUI's reload recipe for a Load GGUF CLIP patcher: the files read again."""
    return load_gguf_clip(list(paths), clip_type)[0].patcher


class LoadGGUFCLIP:
    DESCRIPTION = ("Loads text encoders from .gguf files (T5-XXL with llama.cpp's or ComfyUI's "
                   "tensor names, CLIP-L, CLIP-G) directly into quantized layers, alone or combined "
                   "(with .safetensors files too) as SD3, PixArt, Flux and SDXL need them. Use "
                   "the CLIP with the core CLIP Text Encode nodes.")
    CATEGORY = "QuantKit"
    RETURN_TYPES = ("CLIP",)
    OUTPUT_TOOLTIPS = ("The text encoders, quantized as stored in the files.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        register_text_encoder_folder()
        files = folder_paths.get_filename_list(TE_FOLDER)
        tip = "A .gguf or .safetensors text encoder from models/text_encoders (or models/clip)."
        return {
            "required": {
                "clip_name1": (files, {"tooltip": tip}),
                "type": (list(CLIP_TYPES), {"default": "sd3", "tooltip":
                         "Which model the encoders are for: sd3 (CLIP-L + CLIP-G + T5), pixart "
                         "(T5), flux (CLIP-L + T5), sdxl (CLIP-L + CLIP-G), stable_diffusion (CLIP-L)."}),
            },
            "optional": {
                "clip_name2": ([NONE] + files, {"default": NONE, "tooltip": tip + " Optional."}),
                "clip_name3": ([NONE] + files, {"default": NONE, "tooltip": tip + " Optional."}),
            },
        }

    def load(self, clip_name1, type="sd3", clip_name2=NONE, clip_name3=NONE):
        names = [n for n in (clip_name1, clip_name2, clip_name3) if n and n != NONE]
        paths = [model_file(TE_FOLDER, n) for n in names]
        clip, report = load_gguf_clip(paths, type)
        return {"ui": {"text": (report.summary(),)}, "result": (clip,)}
