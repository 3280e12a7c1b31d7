"""The recipe table (engine/recipes.py): each name defined once, and the other tables that
name recipes naming real ones. Pure torch, no ComfyUI (the menus built from the table are
tested with their nodes)."""
from __future__ import annotations

import pytest

from conftest import pack_module

recipes = pack_module("backends.engine.recipes")
convert = pack_module("backends.gguf.convert")


def test_every_recipe_is_a_diffusion_or_a_text_encoder_recipe_under_its_own_name():
    """RECIPES holds the diffusion recipes then the text-encoder ones, none lost to a
    duplicate name, each filed under the name it carries.
    Shown able to fail: the t5xxl recipe renamed "clip_g" in _TEXT_ENCODERS -> 15 recipes, not 16."""
    names = recipes.DIFFUSION_RECIPES + recipes.TEXT_ENCODERS
    assert len(recipes.RECIPES) == len(names)
    assert list(recipes.RECIPES) == list(names)
    assert all(recipes.get_recipe(name).name == name for name in names)


def test_every_gguf_architecture_uses_a_diffusion_recipe():
    """`python -m backends.gguf.convert --arch` picks the recipe of the architecture's family.
    Shown able to fail: ARCHITECTURES' "sd1": "sd15" in gguf/convert.py -> "sd1" -> 'sd1' is
    not in the diffusion recipes."""
    for arch, recipe in convert.ARCHITECTURES.items():
        assert recipe in recipes.DIFFUSION_RECIPES, f"{arch}: '{recipe}' is not a diffusion recipe"


def test_unknown_recipe_is_a_quantkit_error_naming_the_known_ones():
    """Shown able to fail: Known recipes: {sorted(RECIPES)} in engine/recipes.py's get_recipe
    -> the message no longer reads "sd15, sdxl" (regex does not match)."""
    errors = pack_module("backends.engine.errors")
    with pytest.raises(errors.QuantKitError, match=r"Unknown recipe 'sd9'\. Known recipes: sd15, sdxl"):
        recipes.get_recipe("sd9")
