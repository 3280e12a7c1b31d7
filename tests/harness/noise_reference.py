"""The output error a format ought to cause, from a float computation (not from its code).

A quantizer's rounding error behaves like noise added to each weight. So the model the
format should equal, within its physics, is the float model with Gaussian noise of the
format's relative RMS added to exactly the layers the format quantized (the recipe keeps
the rest). Its output error, `noise_floor_error`, is what an ideal code of the format's
bits would cause at the rate-distortion bound (2^-b); `output_error_band` widens it by the
weight band of tests/harness/tolerances.py. A format one bit coarser, a scale off by a few
per cent, or a layer that was not quantized at all falls outside.
"""
from __future__ import annotations

import torch

from .formats import ACTIVATION_QUANTIZED, FLOAT8_FORMATS
from .tolerances import BAND_ABOVE_BOUND

# The weights' own band carries over to the output: measured output error / floor on the
# tiny SD3 with N(0, 0.02) weights, every CPU format (2026-12-02): 1.48-2.72. Heavy-tailed
# weights are not banded here: per-row codes lose up to 11x there (one outlier sets a row's
# scale), which the weight-level contract tests bound instead.
OUTPUT_BAND = (1.0, BAND_ABOVE_BOUND)
ACTIVATION_BITS = 8


def floor_relative_rms(spec) -> float:
    """Relative RMS weight error of an ideal code with this format's storage."""
    if spec.id in FLOAT8_FORMATS:
        return 2 ** -4 / 3 ** 0.5 / 2  # half of e4m3's top-binade rounding: values spread over binades
    noise = 2 ** -spec.bits_per_weight
    if spec.id in ACTIVATION_QUANTIZED:  # the activations' own rounding, as if it were the weights'
        noise = (noise ** 2 + (2 ** -ACTIVATION_BITS) ** 2) ** 0.5
    return noise


def quantized_layer_names(model) -> dict:
    """{module name: format spec} of the QuantizedLayers in `model` (a torch module)."""
    from conftest import pack_module
    modules = pack_module("backends.engine.modules")
    return {name: m.spec for name, m in model.named_modules() if isinstance(m, modules.QuantizedLayer)}


def expected_quantized_layers(root, format_id: str, recipe_name: str, exclude: str = "",
                              prefix: str = "") -> dict:
    """{module name: format spec} that `recipe_name` should quantize in `root` (the float
    source model), written out from the recipe's and the format's tables rather than taken
    from the quantized model (names relative to `root`, as recipes match them, then
    prefixed with `prefix`): a layer left unquantized by mistake is then missing from the
    noise reference and from the expected set, and the tests see it. `recipe_name` may
    also be a Recipe (the library API's recipes on diffusers' names)."""
    import re
    from conftest import pack_module
    registry = pack_module("backends.engine.registry")
    recipe = (pack_module("backends.engine.recipes").RECIPES[recipe_name]
              if isinstance(recipe_name, str) else recipe_name)
    adapter, spec = registry.get_format(format_id)

    def fits(s, shape):
        width = shape[1:].numel()
        return len(shape) >= 2 and (len(shape) == 2 or s.conv_ok) and width % s.block_size == 0

    out = {}
    for name, m in root.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            continue
        kept = [p for p in recipe.keep + (recipe.final_projection if spec.keep_final_projection else ())
                if re.search(p, name)]
        if kept or (exclude and re.search(exclude, name)) or m.weight.numel() < recipe.min_params:
            continue
        for candidate in (spec, adapter.formats.get(spec.fallback)):
            if candidate is not None and fits(candidate, m.weight.shape):
                out[prefix + name] = candidate
                break
    return out


def recipe_checked_layers(quantized_model, root, format_id: str, recipe_name: str, **kw) -> dict:
    """The expected layers (above) after checking that `quantized_model` quantized exactly
    those, each in the expected format; `kw` as for expected_quantized_layers."""
    expected = expected_quantized_layers(root, format_id, recipe_name, **kw)
    got = {name: spec.id for name, spec in quantized_layer_names(quantized_model).items()}
    want = {name: spec.id for name, spec in expected.items()}
    assert got == want, (f"{format_id}: layers not as recipe '{recipe_name}' says: missing "
                         f"{sorted(set(want) - set(got))}, unexpected {sorted(set(got) - set(want))}, "
                         f"other format {sorted(k for k in got.keys() & want.keys() if got[k] != want[k])}")
    return expected


def noise_floor_error(root, layers: dict, compute, reference, seed: int = 0) -> float:
    """Relative output error once each layer of `root` named in `layers` has Gaussian noise
    of its format's floor_relative_rms added to its weight. `root` is an unquantized copy
    of the source model (changed in place here); `compute()` gives its output."""
    g = torch.Generator().manual_seed(seed)
    named = dict(root.named_modules())
    with torch.no_grad():
        for name, spec in sorted(layers.items()):
            weight = named[name].weight
            w = weight.detach().float().cpu()
            noise = torch.randn(w.shape, generator=g) * w.pow(2).mean().sqrt() * floor_relative_rms(spec)
            weight.copy_((w + noise).to(weight.dtype))
    out = compute()
    return ((out.float() - reference.float()).norm() / reference.float().norm()).item()


def output_error_band(floor_error: float) -> tuple:
    return OUTPUT_BAND[0] * floor_error, OUTPUT_BAND[1] * floor_error


def assert_in_band(label: str, err: float, floor_error: float) -> None:
    low, high = output_error_band(floor_error)
    assert low <= err <= high, f"{label}: output error {err:.5f} outside its physics band {low:.5f}-{high:.5f}"


def lora_effect_bound(floor_with_lora: float, floor_plain: float, with_lora, plain) -> float:
    """How far the LoRA's effect (output with it minus without) may be off, relative to
    its size, when both outputs are within their bands' upper edges."""
    bound = (output_error_band(floor_with_lora)[1] * with_lora.float().norm()
             + output_error_band(floor_plain)[1] * plain.float().norm()) / (with_lora.float() - plain.float()).norm()
    return bound.item()
