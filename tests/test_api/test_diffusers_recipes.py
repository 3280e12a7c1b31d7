"""The recipes on diffusers' and transformers' names (backends/api/diffusers_recipes.py):
chosen by class, and every pattern names layers that the library's real class has."""
from __future__ import annotations

import logging
import re

import pytest
import torch.nn as nn

from conftest import pack_module
from harness import tiny_diffusers as tiny

api_recipes = pack_module("backends.api.diffusers_recipes")
errors = pack_module("backends.engine.errors")

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
FAMILY_RECIPE = {"sd3": "sd3", "unet": "unet", "pixart": "pixart", "flux": "flux",
                 "auraflow": "auraflow", "clip": "clip", "t5": "t5"}


@pytest.mark.parametrize("family", sorted(tiny.BUILDERS))
def test_every_pattern_names_a_layer_of_the_real_class(family):
    """A pattern with a typo, or written on ComfyUI's names instead of diffusers', matches
    nothing and silently quantizes what it was meant to keep. Shown able to fail: the
    flux recipe's r"^x_embedder$" written as ComfyUI's r"^img_in\\." -> "flux: pattern
    '^img_in\\.' matches no Linear/Conv layer"."""
    model = tiny.BUILDERS[family]()
    recipe = api_recipes.recipe_for_class(model)
    assert recipe is not None and recipe.name == FAMILY_RECIPE[family]
    names = [name for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    for pattern in recipe.keep + recipe.final_projection:
        assert any(re.search(pattern, n) for n in names), \
            f"{family}: pattern {pattern!r} matches no Linear/Conv layer"
    kept = {n for n in names if any(re.search(p, n) for p in recipe.keep)}
    assert len(kept) < len(names) / 2, f"{family}: the recipe keeps most layers: {sorted(kept)}"


def test_a_subclass_gets_its_base_class_recipe_and_an_unknown_class_the_generic_one(caplog):
    """Shown able to fail: recipe_for_class looking at type(module) only, not its MRO ->
    "AttributeError: 'NoneType' object has no attribute 'name'" for the subclass."""
    from diffusers import SD3Transformer2DModel

    class MySD3(SD3Transformer2DModel):
        pass

    assert api_recipes.recipe_for_class(MySD3.__new__(MySD3)).name == "sd3"
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        chosen = api_recipes.resolve_recipe(nn.Sequential(nn.Linear(4, 4)), None)
    assert chosen.name == "generic"
    assert "no recipe for Sequential" in caplog.text


def test_an_unknown_recipe_name_lists_the_known_ones():
    """Shown able to fail: get_recipe returning RECIPES.get(name) -> "DID NOT RAISE"."""
    with pytest.raises(errors.UnknownRecipe) as info:
        api_recipes.get_recipe("sdxl")
    assert "Known: unet, sd3, pixart, flux, auraflow, clip, t5, generic" in str(info.value)
