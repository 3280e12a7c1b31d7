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
_DIT_KEEP = (r"^x_embedder\.", r"^t_embedder\.", r"^y_embedder\.mlp\.", r"^t_block\.",
             r"^pos_embed", r"^final_layer\.adaLN_modulation\.", r"^ar_embedder\.",
             r"^csize_embedder\.")

# Quantize Model's recipe menu shows them in this order (after "auto").
_DIFFUSION = (
    Recipe("sd15", keep=_UNET_KEEP, final_projection=(r"^out\.",)),
    Recipe("sdxl", keep=_UNET_KEEP, final_projection=(r"^out\.",)),
    Recipe("sd3", keep=_DIT_KEEP, final_projection=(r"^final_layer\.linear$",)),
    Recipe("pixart", keep=_DIT_KEEP, final_projection=(r"^final_layer\.linear$",)),
    Recipe("generic", final_projection=(r"(^|\.)(final_layer|proj_out|out)(\.|$)",)),
)
# One per text encoder, named as the attribute that holds it in ComfyUI's CLIP wrapper (names
# relative to that encoder). Their embeddings and layer norms are not Linear: never quantized.
_TEXT_ENCODERS = (
    Recipe("clip_l", final_projection=(r"text_projection",)),
    Recipe("clip_g", final_projection=(r"text_projection",)),
    Recipe("t5xxl"),
)

DIFFUSION_RECIPES: Tuple[str, ...] = tuple(r.name for r in _DIFFUSION)
TEXT_ENCODERS: Tuple[str, ...] = tuple(r.name for r in _TEXT_ENCODERS)
RECIPES: Dict[str, Recipe] = {r.name: r for r in _DIFFUSION + _TEXT_ENCODERS}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UnknownRecipe(f"Unknown recipe '{name}'. Known recipes: {', '.join(RECIPES)}.") from None
