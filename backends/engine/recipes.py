"""Per-family recipes as data: which layers stay in high precision.

Patterns are regular expressions matched (re.search) against module names relative to
the quantized root (the diffusion model, or one text encoder).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from .errors import UnknownRecipe


@dataclass(frozen=True)
class Recipe:
    name: str
    keep: Tuple[str, ...] = ()  # always high precision: embeddings, first/last layers
    final_projection: Tuple[str, ...] = ()  # also kept when the format is 4-bit or less
    min_params: int = 16384  # smaller layers are kept: saving nothing, costing accuracy

    def __post_init__(self):
        if self.min_params < 0:
            raise ValueError("min_params must be >= 0")


_UNET_KEEP = (r"^input_blocks\.0\.0$", r"^out\.", r"^time_embed\.", r"^label_emb\.")
# SD3's MMDiT: patch, timestep and pooled-text embedders, the last layer's modulation.
_SD3_KEEP = (r"^x_embedder\.", r"^t_embedder\.", r"^y_embedder\.mlp\.", r"^final_layer\.adaLN_modulation\.")
# PixArt: patch and timestep embedders, the shared modulation (t_block), Alpha's size and
# aspect-ratio embedders.
_PIXART_KEEP = (r"^x_embedder\.", r"^t_embedder\.", r"^t_block\.", r"^ar_embedder\.", r"^csize_embedder\.")

# Flux (ComfyUI's comfy/ldm/flux): the image, timestep, pooled-text, guidance and text
# embedders, the last layer's modulation, and Flux.2's three shared modulations. Each block's
# own modulation (img_mod, txt_mod, modulation: a quarter of the weights) is quantized, as
# SD3's per-block adaLN is.
_FLUX_KEEP = (r"^img_in$", r"^time_in\.", r"^vector_in\.", r"^guidance_in\.", r"^txt_in$",
              r"^final_layer\.adaLN_modulation\.", r"^(double|single)_stream_modulation")
# AuraFlow (comfy/ldm/aura/mmdit.py): timestep embedder, text and patch inputs, the last
# modulation (modF); per-block modC/modX/modCX are quantized.
_AURAFLOW_KEEP = (r"^t_embedder\.", r"^cond_seq_linear$", r"^init_x_linear$", r"^modF\.")

# Quantize Model's recipe menu shows them in this order (after "auto").
_DIFFUSION = (
    Recipe("sd15", keep=_UNET_KEEP, final_projection=(r"^out\.",)),
    Recipe("sdxl", keep=_UNET_KEEP, final_projection=(r"^out\.",)),
    Recipe("sd3", keep=_SD3_KEEP, final_projection=(r"^final_layer\.linear$",)),
    Recipe("pixart", keep=_PIXART_KEEP, final_projection=(r"^final_layer\.linear$",)),
    Recipe("flux", keep=_FLUX_KEEP, final_projection=(r"^final_layer\.linear$",)),
    Recipe("auraflow", keep=_AURAFLOW_KEEP, final_projection=(r"^final_linear$",)),
    Recipe("generic", final_projection=(r"(^|\.)(final_layer|proj_out|out)(\.|$)",)),
)
# One per text encoder, named as the attribute that holds it in ComfyUI's CLIP wrappers (names
# relative to that encoder). Their embeddings and layer norms are not Linear: never quantized.
_CLIP = dict(final_projection=(r"text_projection",))
_TEXT_ENCODERS = (
    Recipe("clip_l", **_CLIP),
    Recipe("clip_g", **_CLIP),
    Recipe("t5xxl"),  # SD3, PixArt, Flux, HiDream, Mochi, LTXV, Cosmos
    Recipe("clip_h", **_CLIP),  # SD2
    Recipe("pile_t5xl"),  # AuraFlow
    Recipe("umt5xxl"),  # Wan
    Recipe("t5base"),  # Stable Audio
    Recipe("umt5base"),  # ACE-Step
    Recipe("mt5xl"),  # Hunyuan-DiT
)

DIFFUSION_RECIPES: Tuple[str, ...] = tuple(r.name for r in _DIFFUSION)
TEXT_ENCODERS: Tuple[str, ...] = tuple(r.name for r in _TEXT_ENCODERS)
RECIPES: Dict[str, Recipe] = {r.name: r for r in _DIFFUSION + _TEXT_ENCODERS}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UnknownRecipe(f"Unknown recipe '{name}'. Known recipes: {', '.join(RECIPES)}.") from None
