"""Quantize Model: MODEL in, a new quantized MODEL out."""
from __future__ import annotations

import logging

import comfy.model_management
import torch

from ..backends.engine.recipes import DIFFUSION_RECIPES, get_recipe
from ..backends.engine.registry import all_format_ids
from .clone_and_quantize import QUANTIZE_ON, quantize_patcher
from .format_check import format_problem

log = logging.getLogger(__name__)

RECIPE_CHOICES = ["auto", *DIFFUSION_RECIPES]
DEFAULT_FORMAT = "torchao:int8wo"  # GPUs: faithful, about bf16 speed on DiT models
# CPU-only ComfyUI: W8A8 through torch._int_mm is the one 8-bit format clearly faster than
# fp32 there (1.3-1.8x on the full SD1.5 UNet, four runs); int8wo is at about fp32 speed.
CPU_DEFAULT_FORMAT = "torchao:int8dq"
COMPUTE_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# ComfyUI's model config class -> our recipe
FAMILY_BY_CONFIG = {
    "SD15": "sd15", "SD20": "sd15", "SD21UnclipL": "sd15", "SD21UnclipH": "sd15",
    "SDXL": "sdxl", "SDXLRefiner": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl",
    "SD3": "sd3", "PixArtAlpha": "pixart", "PixArtSigma": "pixart",
    "Flux": "flux", "FluxSchnell": "flux", "FluxInpaint": "flux", "Flux2": "flux",
    "AuraFlow": "auraflow",
}


def default_format() -> str:
    """The format a new Quantize Model node starts with, for the device ComfyUI runs on
    (saved workflows keep the format they chose)."""
    cpu_only = comfy.model_management.get_torch_device().type == "cpu"
    return CPU_DEFAULT_FORMAT if cpu_only else DEFAULT_FORMAT


def model_config_name(model) -> str:
    return type(model.model.model_config).__name__


def detect_family(model) -> str:
    return FAMILY_BY_CONFIG.get(model_config_name(model), "generic")


def unknown_family_warning(model) -> str:
    return (f"Warning: QuantKit has no recipe for this model (ComfyUI detects it as "
            f"{model_config_name(model)}), so the generic recipe was used: every Linear and Conv "
            f"layer of {get_recipe('generic').min_params} weights or more is quantized, embedders "
            f"and modulation included. Compare images with the unquantized model; if they differ "
            f"too much, name the sensitive layers in 'exclude' or choose a recipe.")


class QuantizeModel:
    DESCRIPTION = ("Quantizes the diffusion model's Linear and Conv layers into a smaller "
                   "format. The input MODEL is not changed; the output is a new MODEL.")
    CATEGORY = "QuantKit"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The quantized model. Use it wherever a MODEL goes (KSampler, LoRA, compile).",)
    FUNCTION = "quantize"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to quantize (left unchanged)."}),
                "format": (all_format_ids(), {
                    "default": default_format(),
                    "tooltip": "backend:format. 8-bit formats keep quality close to bf16 at half "
                               "the size; 4-bit formats save more and lose more. Fastest on "
                               "NVIDIA GPUs: torchao:int8wo (the default) and every gguf type "
                               "(gguf:Q8_0 is the most faithful 8-bit format): layers called one "
                               "after another decode their weights in one kernel, near bf16's "
                               "step time. torchao:int8dq and fp8dq (fused 8-bit kernels) and "
                               "bnb:nf4 are fast on DiTs (PixArt, SD3), slower on UNets. On a CPU "
                               "int8dq, the default there, is 1.2-1.8x faster than fp32. quanto "
                               "and torchao:int4wo rebuild each layer's weight in several steps "
                               "(slower). Formats marked CUDA in the README need an NVIDIA GPU."}),
                "recipe": (RECIPE_CHOICES, {
                    "default": "auto",
                    "tooltip": "Which layers stay in high precision (embeddings, first/last "
                               "layers). 'auto' picks the recipe of the model's family (SD1.5/2, "
                               "SDXL, SD3, PixArt, Flux, AuraFlow); other models get 'generic', "
                               "and the node says so."}),
            },
            "optional": {
                "exclude": ("STRING", {
                    "default": "", "multiline": False,
                    "tooltip": "Regular expression of layer names to keep unquantized, "
                               "e.g. 'attn2|proj_out'. Empty: none."}),
                "quantize_on": (QUANTIZE_ON, {
                    "default": "auto",
                    "tooltip": "Where the quantization math runs, one layer at a time. 'cpu' "
                               "uses no GPU memory (slower); 'auto' uses the GPU when there is one."}),
                "compute_dtype": (list(COMPUTE_DTYPES), {
                    "default": "auto",
                    "tooltip": "The precision layers compute in (weights are dequantized to it). "
                               "'auto' keeps ComfyUI's choice: bf16 where the GPU supports it."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, format):
        return format_problem(format) or True

    def quantize(self, model, format, recipe, exclude="", quantize_on="auto", compute_dtype="auto"):
        family = detect_family(model) if recipe == "auto" else recipe
        new_model, reports = quantize_patcher(model, [("diffusion_model", family, "diffusion model")],
                                              format, exclude, quantize_on)
        if COMPUTE_DTYPES[compute_dtype] is not None:
            new_model.set_model_compute_dtype(COMPUTE_DTYPES[compute_dtype])  # ComfyUI's own mechanism
        lines = [r.summary() for r in reports]
        if recipe == "auto" and family == "generic":
            warning = unknown_family_warning(model)
            log.warning(warning)
            lines.insert(0, warning)
        return {"ui": {"text": ("\n".join(lines),)}, "result": (new_model,)}
