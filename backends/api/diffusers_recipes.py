"""Recipes on the module names of diffusers' denoisers and transformers' text encoders.

The same choices as the ComfyUI recipes (engine/recipes.py), written on the names these
libraries give the same layers: ComfyUI's `x_embedder` is diffusers' `pos_embed.proj`, its
`final_layer.linear` is `proj_out`, its `input_blocks.0.0` is `conv_in`. A component is
matched by its class name (or a base class's), so neither library is imported here.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Union

import torch.nn as nn

from ..engine.errors import UnknownRecipe
from ..engine.recipes import RECIPES as COMFY_RECIPES
from ..engine.recipes import Recipe

log = logging.getLogger("quantkit")

# Patterns match (re.search) names relative to the component (pipe.transformer, pipe.unet,
# pipe.text_encoder_3, ...). Kept: the embedders of the input, the timestep and the pooled
# text, and the final modulation; the final projection too when the format is 4-bit or less.
_BY_CLASS = (
    # SD1.5, SD2, SDXL: conv_in, the time and added-condition embeddings; conv_out is both
    # the last layer and the final projection
    (("UNet2DConditionModel",),
     Recipe("unet", keep=(r"^conv_in$", r"^conv_out$", r"^time_embedding\.", r"^add_embedding\.",
                          r"^class_embedding\."),
            final_projection=(r"^conv_out$",))),
    # SD3, SD3.5 (MMDiT): the patch, timestep and pooled-text embedders, norm_out's modulation
    (("SD3Transformer2DModel",),
     Recipe("sd3", keep=(r"^pos_embed\.", r"^time_text_embed\.", r"^norm_out\.linear$"),
            final_projection=(r"^proj_out$",))),
    # PixArt alpha/sigma: adaln_single holds the timestep, size and aspect embedders and t_block
    (("PixArtTransformer2DModel",),
     Recipe("pixart", keep=(r"^pos_embed\.", r"^adaln_single\."), final_projection=(r"^proj_out$",))),
    # Flux: x_embedder is the patch embedder (a Linear); the guidance embedder sits in time_text_embed
    (("FluxTransformer2DModel",),
     Recipe("flux", keep=(r"^x_embedder$", r"^time_text_embed\.", r"^norm_out\.linear$"),
            final_projection=(r"^proj_out$",))),
    (("AuraFlowTransformer2DModel",),
     Recipe("auraflow", keep=(r"^pos_embed\.", r"^time_step_proj\.", r"^norm_out\.linear$"),
            final_projection=(r"^proj_out$",))),
    # CLIP-L/CLIP-G (their embeddings and norms are not Linear: never quantized)
    (("CLIPTextModel", "CLIPTextModelWithProjection"),
     Recipe("clip", final_projection=(r"^text_projection$",))),
    # T5-XXL, UMT5. `wo` stays: transformers keeps it in float32 (fp16 overflows there) and
    # casts its input to `wo.weight.dtype`, which for a quantized layer is the packed
    # payload's (uint8 for GGUF): the activations would be destroyed.
    (("T5EncoderModel", "UMT5EncoderModel"), Recipe("t5", keep=(r"\.wo$",))),
)

GENERIC = COMFY_RECIPES["generic"]  # no family-specific names: only the final projection
RECIPE_BY_CLASS: Dict[str, Recipe] = {cls: recipe for classes, recipe in _BY_CLASS for cls in classes}
RECIPES: Dict[str, Recipe] = {**{recipe.name: recipe for _, recipe in _BY_CLASS}, GENERIC.name: GENERIC}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UnknownRecipe(f"Unknown recipe '{name}' for diffusers/transformers modules. Known: "
                            f"{', '.join(RECIPES)}; or pass a Recipe, or None to choose by the "
                            f"module's class.") from None


def recipe_for_class(module: nn.Module) -> Optional[Recipe]:
    """The recipe of the module's class or of its nearest base class in the table, or None."""
    for cls in type(module).__mro__:
        if cls.__name__ in RECIPE_BY_CLASS:
            return RECIPE_BY_CLASS[cls.__name__]
    return None


def resolve_recipe(module: nn.Module, recipe: Union[str, Recipe, None]) -> Recipe:
    """A Recipe from what the caller passed: a Recipe, a name, or None (by class, else the
    generic recipe with a warning)."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe is not None:
        return get_recipe(recipe)
    found = recipe_for_class(module)
    if found is None:
        log.warning("QuantKit: no recipe for %s; using the generic one (only the final projection "
                    "is kept in high precision). Pass recipe=... to choose; known: %s.",
                    type(module).__name__, ", ".join(RECIPES))
        return GENERIC
    return found
