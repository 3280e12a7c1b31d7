"""quantize_pipeline(): a diffusers pipeline's denoiser and text encoders, each with the
recipe of its class, in place. Duck-typed on `pipe.components`: diffusers is not imported."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Dict, Iterable, Optional, Union

import torch.nn as nn

from ..engine.errors import QuantKitError
from ..engine.recipes import Recipe
from ..engine.report import QuantReport
from .diffusers_recipes import recipe_for_class
from .module import quantize

log = logging.getLogger("quantkit")

# SDXL's and SD3's pipelines hold CLIP-G (ViT-bigG) in this slot. It loses much more than
# the other encoders when quantized (as Quantize Text Encoder's 'auto' in ComfyUI): kept
# unless named in `components`.
CLIP_G_SLOT = "text_encoder_2"


def _is_autoencoder(name: str, module: nn.Module) -> bool:
    return "vae" in name.lower() or any(c.__name__.startswith(("Autoencoder", "VQModel"))
                                         for c in type(module).__mro__)


def _modules(pipe) -> Dict[str, nn.Module]:
    components = getattr(pipe, "components", None)
    if not isinstance(components, Mapping):
        raise QuantKitError(f"quantize_pipeline() takes a diffusers pipeline (an object with a "
                            f".components dict); got {type(pipe).__name__}. For one model use "
                            f"quantize(module, format_id).")
    return {name: m for name, m in components.items() if isinstance(m, nn.Module)}


def default_components(found: Dict[str, nn.Module]) -> list:
    """The denoiser and text encoders: every component whose class has a recipe, but CLIP-G."""
    chosen = []
    for name, module in found.items():
        recipe = recipe_for_class(module)
        if recipe is None:
            continue
        if name == CLIP_G_SLOT and recipe.name == "clip":
            log.info("QuantKit: %s (CLIP-G) kept in high precision; name it in components= to "
                     "quantize it.", name)
            continue
        chosen.append(name)
    return chosen


def _checked(components: Iterable[str], found: Dict[str, nn.Module]) -> list:
    chosen = list(components)
    for name in chosen:
        if name not in found:
            raise QuantKitError(f"This pipeline has no model component '{name}'. It has: "
                                f"{', '.join(found)}.")
        if _is_autoencoder(name, found[name]):
            raise QuantKitError(f"'{name}' is the pipeline's autoencoder, which QuantKit never "
                                f"quantizes (it is a small part of the memory, and its errors land "
                                f"directly on the pixels). Leave it out of components.")
    return chosen


def quantize_pipeline(pipe, format_id: str, *, components: Optional[Iterable[str]] = None,
                      recipes: Optional[Mapping] = None, exclude: Optional[str] = None,
                      run_device=None, work_device=None) -> Dict[str, QuantReport]:
    """Quantizes the pipeline's denoiser (transformer or unet) and text encoders in place,
    each with its family's recipe, and returns {component name: QuantReport}.

    components: the names to quantize; default: every component whose class has a recipe
    (backends/api/diffusers_recipes.py) except CLIP-G (`text_encoder_2` of SDXL and SD3).
    The VAE is never quantized.
    recipes: {component name: recipe name or Recipe}, overriding the choice by class.
    exclude, run_device, work_device: as for quantize(), for every component.
    """
    found = _modules(pipe)
    chosen = default_components(found) if components is None else _checked(components, found)
    overrides: Dict[str, Union[str, Recipe]] = dict(recipes or {})
    stray = sorted(set(overrides) - set(chosen))
    if stray:
        raise QuantKitError(f"recipes= names {', '.join(stray)}, which this call does not quantize "
                            f"(it quantizes {', '.join(chosen)}). Add them to components= or "
                            f"remove them from recipes=.")
    return {name: quantize(found[name], format_id, overrides.get(name), exclude=exclude,
                           run_device=run_device, work_device=work_device, name=name)
            for name in chosen}
