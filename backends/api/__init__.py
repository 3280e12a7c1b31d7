"""QuantKit as a library, outside ComfyUI (pure torch: diffusers and transformers are never
imported, their classes are recognised by name):

    quantize(module, "gguf:Q4_K", recipe=None)  any torch.nn.Module, in place -> QuantReport
    quantize_pipeline(pipe, "gguf:Q4_K")        a diffusers pipeline's denoiser and text
                                                encoders, in place -> {name: QuantReport}

module.py (quantize), pipeline.py (quantize_pipeline), diffusers_recipes.py (recipes on
diffusers' and transformers' module names). README: "Use it outside ComfyUI (diffusers)".
"""
from ..engine.recipes import Recipe
from ..engine.registry import all_format_ids
from .diffusers_recipes import RECIPES
from .module import quantize
from .pipeline import quantize_pipeline

__all__ = ["quantize", "quantize_pipeline", "Recipe", "RECIPES", "all_format_ids"]
