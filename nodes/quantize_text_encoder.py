"""Quantize Text Encoder: CLIP in (one or several encoders), a new quantized CLIP out."""
from __future__ import annotations

import comfy.clip_model
import comfy.text_encoders.t5

from ..backends.engine.errors import QuantKitError
from ..backends.engine.recipes import TEXT_ENCODERS as KNOWN_ENCODERS
from ..backends.engine.registry import all_format_ids
from .clone_and_quantize import QUANTIZE_ON, quantize_patcher
from .format_check import format_problem

# The menu as released: saved workflows store these values, so they never change.
ENCODER_CHOICES = ["auto", "all", "t5xxl", "clip_l", "clip_g", "clip_l+t5xxl",
                   "clip_l+clip_g", "clip_g+t5xxl"]
DEFAULT_FORMAT = "torchao:int8wo"
# What a known encoder wraps as `.transformer` in ComfyUI: a CLIP text tower or a T5 encoder
# (every T5 variant ComfyUI builds is this class with another config). A same-named encoder
# of another kind is not quantized.
ENCODER_NETWORKS = (comfy.clip_model.CLIPTextModel, comfy.text_encoders.t5.T5)


def present_encoders(clip):
    """(the encoders this CLIP holds that the node quantizes, in recipe order; the others)."""
    model = clip.cond_stage_model
    held = dict(model.named_children())
    known = [name for name in KNOWN_ENCODERS if name in held
             and isinstance(getattr(held[name], "transformer", None), ENCODER_NETWORKS)]
    others = [name for name in held if name not in known]
    if not known:
        has = f"it holds {', '.join(others)}" if others else "it holds none"
        raise QuantKitError(
            f"This CLIP ({type(model).__name__}) holds no encoder Quantize Text Encoder knows "
            f"({has}). The node quantizes CLIP text encoders and T5 encoders as ComfyUI builds "
            f"them: {', '.join(KNOWN_ENCODERS)} (SD1.5/2, SDXL, SD3, PixArt, Flux, AuraFlow, "
            f"Wan, ...). Connect this CLIP to the text-encode node unquantized.")
    return known, others


def choose_encoders(clip, choice: str):
    found, _ = present_encoders(clip)
    if choice == "all":
        return found
    if choice == "auto":
        # CLIP-G loses much more than the others when quantized: keep it unless asked.
        chosen = [e for e in found if e != "clip_g"]
        if not chosen:
            raise QuantKitError("This CLIP holds only CLIP-G, which 'auto' keeps in high "
                                "precision (it quantizes badly). Choose 'clip_g' to quantize it anyway.")
        return chosen
    wanted = choice.split("+")
    missing = [e for e in wanted if e not in found]
    if missing:
        raise QuantKitError(f"Asked to quantize {', '.join(missing)}, but this CLIP holds only "
                            f"{', '.join(found)}. Pick one of those, or 'auto'.")
    return wanted


class QuantizeTextEncoder:
    DESCRIPTION = ("Quantizes the text encoders inside a CLIP (CLIP-L, CLIP-G, CLIP-H, T5-XXL "
                   "and the other T5 variants: AuraFlow's Pile-T5, Wan's UMT5, ...). The input "
                   "CLIP is not changed; tokenizers are untouched.")
    CATEGORY = "QuantKit"
    RETURN_TYPES = ("CLIP",)
    OUTPUT_TOOLTIPS = ("The CLIP with quantized encoders; use it with any CLIP Text Encode node.",)
    FUNCTION = "quantize"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "Text encoders from any CLIP loader (left unchanged)."}),
                "format": (all_format_ids(), {
                    "default": DEFAULT_FORMAT,
                    "tooltip": "backend:format used for the chosen encoders. T5-XXL is most of "
                               "the memory of SD3 and PixArt: 8-bit halves it."}),
                "encoders": (ENCODER_CHOICES, {
                    "default": "auto",
                    "tooltip": "Which encoders to quantize. 'auto': all but CLIP-G, which "
                               "quantizes badly. Asking for one the CLIP lacks is an error."}),
            },
            "optional": {
                "quantize_on": (QUANTIZE_ON, {
                    "default": "auto",
                    "tooltip": "Where the quantization math runs. 'cpu' uses no GPU memory."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, format):
        return format_problem(format) or True

    def quantize(self, clip, format, encoders, quantize_on="auto"):
        chosen = choose_encoders(clip, encoders)
        targets = [(name, name, name) for name in chosen]
        new_patcher, reports = quantize_patcher(clip.patcher, targets, format, "", quantize_on)
        new_clip = clip.clone()
        new_clip.patcher = new_patcher
        new_clip.cond_stage_model = new_patcher.model
        lines = [r.summary() for r in reports]
        lines += [f"{name}: left as it is (not a CLIP or T5 encoder, the kinds this node "
                  f"quantizes)" for name in present_encoders(clip)[1]]
        return {"ui": {"text": ("\n".join(lines),)}, "result": (new_clip,)}
