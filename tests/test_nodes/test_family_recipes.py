"""Model families as the ComfyUI under test builds them (both versions; meta tensors, no
weights): its detection maps each real model to the family's recipe, every pattern of a
recipe names a real layer, and Flux and AuraFlow keep exactly the layers written out below
from ComfyUI's model code (comfy/ldm/flux, comfy/ldm/aura/mmdit.py). A model without a
recipe gets the generic one, and the node says so."""
from __future__ import annotations

import re

import pytest
import torch

from bench.standins import components as c
from conftest import pack_module
from harness.tiny_models import fill_state_dict

quantize = pack_module("backends.engine.quantize")
recipes = pack_module("backends.engine.recipes")
registry = pack_module("backends.engine.registry")
report = pack_module("backends.engine.report")

SD21_UNCLIP = {**{k: v for k, v in c.SD15_UNET.items() if k != "num_heads"}, "context_dim": 1024,
               "use_linear_in_transformer": True, "num_head_channels": 64, "adm_in_channels": 1536,
               "num_classes": "sequential"}
PIXART_ALPHA = {"num_heads": 16, "patch_size": 2, "hidden_size": 1152, "in_channels": 4, "depth": 28,
                "model_max_length": 120, "image_model": "pixart_alpha", "micro_condition": True}


def flux2_dev() -> dict:
    """FLUX.2 [dev] as ComfyUI's detection reports it (hidden 6144, 8 + 48 blocks)."""
    config = {**c.flux_unet(8, 48), "image_model": "flux2", "axes_dim": [32, 32, 32, 32], "num_heads": 48,
              "mlp_ratio": 3.0, "theta": 2000, "out_channels": 128, "in_channels": 128, "hidden_size": 6144,
              "context_in_dim": 15360, "global_modulation": True, "vec_in_dim": None, "mlp_silu_act": True,
              "qkv_bias": False, "ops_bias": False, "patch_size": 1}
    if "txt_ids_dims" in config:
        config["txt_ids_dims"] = [3]
    return config


# (ComfyUI's model config class, the released model's config, the recipe auto picks)
REAL_MODELS = [
    ("SD15", lambda: c.SD15_UNET, "sd15"),
    ("SD21UnclipL", lambda: SD21_UNCLIP, "sd15"),
    ("SDXL", lambda: c.SDXL_UNET, "sdxl"),
    ("SD3", lambda: c.sd3_unet(24), "sd3"),
    ("PixArtAlpha", lambda: PIXART_ALPHA, "pixart"),
    ("PixArtSigma", lambda: c.pixart_sigma_unet(28), "pixart"),
    ("Flux", lambda: c.flux_unet(19, 38), "flux"),
    ("Flux2", flux2_dev, "flux"),
    ("AuraFlow", lambda: c.auraflow_unet(4, 36), "auraflow"),
]

# Written from ComfyUI's model code: embedders, the last layer's modulation, Flux.2's shared
# modulations (per-block modulation is quantized, as SD3's is); then the final projection.
KEPT = {
    "Flux": {"img_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
             "guidance_in.in_layer", "guidance_in.out_layer", "txt_in", "final_layer.adaLN_modulation.1"},
    "Flux2": {"img_in", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer",
              "txt_in", "final_layer.adaLN_modulation.1", "double_stream_modulation_img.lin",
              "double_stream_modulation_txt.lin", "single_stream_modulation.lin"},
    "AuraFlow": {"t_embedder.mlp.0", "t_embedder.mlp.2", "cond_seq_linear", "init_x_linear", "modF.1"},
}
FINAL_PROJECTION = {"Flux": "final_layer.linear", "Flux2": "final_layer.linear", "AuraFlow": "final_linear"}


@pytest.fixture(scope="module")
def real_models(comfy):
    """{config class: ComfyUI's diffusion model of the released size, on the meta device}."""
    return {name: c.diffusion_model(name, config(), torch.float16).diffusion_model
            for name, config, _ in REAL_MODELS}


def layers_of(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, quantize.QUANTIZABLE)]


def test_comfyui_detects_each_real_model_as_the_family_of_its_recipe(real_models):
    """ComfyUI's own detection, run on each model's tensors, names the config class that
    auto maps to the family's recipe.
    Shown able to fail: FAMILY_BY_CONFIG in nodes/quantize_model.py without "Flux2" ->
    {'Flux2': 'generic'} differs; "AuraFlow": "flux" -> {'AuraFlow': 'flux'} differs."""
    import comfy.model_detection as md
    family_by_config = pack_module("nodes.quantize_model").FAMILY_BY_CONFIG
    detected = {}
    for name, _, family in REAL_MODELS:
        config = md.model_config_from_unet(real_models[name].state_dict(), "")
        detected[name] = (type(config).__name__, family_by_config.get(type(config).__name__, "generic"))
    assert detected == {name: (name, family) for name, _, family in REAL_MODELS}


FAMILY_RECIPES = [r for r in recipes.DIFFUSION_RECIPES if r != "generic"]


@pytest.mark.parametrize("recipe", FAMILY_RECIPES, ids=FAMILY_RECIPES)
def test_every_pattern_of_a_recipe_names_a_layer_of_its_family(real_models, recipe):
    """A keep or final-projection pattern that matches no Linear/Conv layer of any model of
    its family (parameters such as position embeddings are never quantized) is dead.
    Shown able to fail: _FLUX_KEEP's r"^img_in$" written r"^img_in\\." -> "flux: '^img_in\\\\.'
    matches no layer"; r"^pos_embed" added to _SD3_KEEP (it is a parameter) -> "sd3:
    '^pos_embed' matches no layer"."""
    names = [n for name, _, family in REAL_MODELS if family == recipe for n, _ in layers_of(real_models[name])]
    r = recipes.get_recipe(recipe)
    for pattern in r.keep + r.final_projection:
        assert any(re.search(pattern, n) for n in names), f"{recipe}: {pattern!r} matches no layer"


@pytest.mark.parametrize("name", sorted(KEPT))
def test_flux_and_auraflow_keep_their_embedders_and_quantize_every_block(real_models, name):
    """At 8 bits the recipe keeps exactly the written-out layers and quantizes the rest (every
    block layer, their modulation included); at 4 bits the final projection is kept too.
    Shown able to fail: r"^txt_in$" left out of _FLUX_KEEP -> Flux and Flux2 miss 'txt_in';
    r"^modF\\." in _AURAFLOW_KEEP written r"mod" -> every modC/modX/modCX layer is kept too."""
    family = dict((n, f) for n, _, f in REAL_MODELS)[name]
    recipe = recipes.get_recipe(family)
    for fmt, expected in (("torchao:int8wo", KEPT[name]), ("gguf:Q4_K", KEPT[name] | {FINAL_PROJECTION[name]})):
        adapter, spec = registry.get_format(fmt)
        plans = {n: quantize.plan_layer(n, m, adapter, spec, recipe, None) for n, m in layers_of(real_models[name])}
        kept = {n for n, (action, _, _) in plans.items() if action == report.KEPT}
        assert kept == expected, f"{fmt}: kept {sorted(kept - expected)} too, not {sorted(expected - kept)}"
        assert all(action == report.QUANTIZED for n, (action, _, _) in plans.items() if n not in expected)


# ---- a model ComfyUI knows and QuantKit has no recipe for --------------------------------------

WAN_TINY = {"image_model": "wan2.1", "model_type": "t2v", "dim": 128, "out_dim": 16, "num_heads": 1,
            "ffn_dim": 256, "num_layers": 1, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1),
            "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16}


@pytest.fixture(scope="module")
def tiny_wan(comfy):
    """Wan 2.1 text-to-video, one block 128 wide (detection reads the width and counts the
    blocks), loaded by ComfyUI's own loader from random weights."""
    import comfy.sd
    state_dict = fill_state_dict(c.diffusion_model_file("WAN21_T2V", WAN_TINY), seed=5, heavy=False)
    return comfy.sd.load_diffusion_model_state_dict(state_dict)


def test_a_family_without_recipe_gets_the_generic_one_and_a_warning(comfy, tiny_wan):
    """auto on a model ComfyUI detects (Wan 2.1) but QuantKit has no recipe for: the generic
    recipe quantizes it and the node's text says so first, naming ComfyUI's model config;
    choosing a recipe yourself (even 'generic') gives no warning.
    Shown able to fail: QuantizeModel.quantize not inserting the warning -> the text starts
    with "diffusion model: "; the warning given for every 'generic' run -> the explicit
    run's text starts with "Warning"."""
    node = comfy.NODE_CLASS_MAPPINGS["QuantKitQuantizeModel"]()
    assert pack_module("nodes.quantize_model").detect_family(tiny_wan) == "generic"
    out = node.quantize(tiny_wan, "torchao:int8dq", "auto")
    first, *rest = out["ui"]["text"][0].split("\n")
    assert first.startswith("Warning: QuantKit has no recipe for this model (ComfyUI detects it as WAN21_T2V)")
    assert "generic recipe was used" in first
    assert rest[0].startswith("diffusion model: torchao:int8dq (generic recipe)")
    quantized = [m for m in out["result"][0].model.diffusion_model.modules()
                 if isinstance(m, pack_module("backends.engine.modules").QuantizedLayer)]
    assert quantized, "the generic recipe quantized nothing"
    chosen = node.quantize(tiny_wan, "torchao:int8dq", "generic")["ui"]["text"][0]
    assert chosen.startswith("diffusion model: torchao:int8dq (generic recipe)")
