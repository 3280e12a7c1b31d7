"""Baseline diffusion models built by ComfyUI's own loader (comfy.sd.load_diffusion_model_state_dict,
what UNETLoader calls), so that they are held as ComfyUI holds them (Dynamic VRAM where
that is on): a file stored in bf16/fp16/fp32/fp8 (UNETLoader's weight_dtype), or a
checkpoint in core's per-layer quantized layout (`weight`, `weight_scale`, `comfy_quant`;
current ComfyUI computes them with comfy-kitchen's kernels). Core's checkpoints quantize
the same Linear layers as the model's QuantKit recipe, one scale per tensor."""
from __future__ import annotations

import re

import torch

from . import formats as F


def _quantized_names(sd: dict, recipe) -> list:
    """Layers (state-dict prefixes) the recipe would quantize that core's layouts can hold
    (Linear weights: 2-D)."""
    names = []
    for key, t in sd.items():
        if not key.endswith(".weight") or t.dim() != 2 or t.numel() < recipe.min_params:
            continue
        name = key[: -len(".weight")]
        if not any(re.search(p, name) for p in recipe.keep):
            names.append(name)
    return names


def native_state_dict(env, spec, sd: dict, layout: str) -> dict:
    recipe = env.pack.recipes.get_recipe(spec.recipe)
    out = dict(sd)
    for name in _quantized_names(sd, recipe):
        weight = out.pop(f"{name}.weight")
        out.update({f"{name}.{k}": v for k, v in env.pack.native_export.native_layer(weight, layout).items()})
    return out


def build(env, spec, sd: dict, fmt: str):
    """The ModelPatcher ComfyUI's loader makes of `sd` stored as baseline `fmt`, or of its
    copy in core's layout `fmt`."""
    layout = F.LOADED.get(fmt)
    if layout is None:  # a file stored in that dtype, loaded with it as weight_dtype
        dtype = F.BASELINES[fmt]
        source = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        options = {"dtype": dtype}
    else:
        source, options = native_state_dict(env, spec, sd, layout), {}
    def load(**kw):  # ComfyUI's loader takes keys out of the dict it is given
        return env.sd.load_diffusion_model_state_dict(dict(source), model_options=options, **kw)
    patcher = load()
    if patcher is None and layout is not None:
        raise RuntimeError(f"ComfyUI's loader did not recognise the {spec.label} state dict")
    if patcher is not None and getattr(patcher, "cached_patcher_init", False) is None:
        # ComfyUI 0.33's file loaders record how to load the model again; TorchCompileModel
        # needs it to make a non-dynamic copy (clone(disable_dynamic=True)), as a user's has
        patcher.cached_patcher_init = (load, ())
    return patcher  # None: a reduced-size model (CPU smoke), which ComfyUI's detection refuses
