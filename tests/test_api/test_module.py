"""quantize() (backends/api/module.py) on diffusers' denoisers and transformers' text
encoders built from configs: the recipe of the class keeps exactly the layers it names, the
output stays within the format's band of the unquantized component (noise reference:
tests/harness/noise_reference.py) and the bytes are what the format promises."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn

from conftest import pack_module
from harness import tiny_diffusers as tiny
from harness.draws import rel_err
from harness.noise_reference import (assert_in_band, expected_quantized_layers, noise_floor_error,
                                     recipe_checked_layers)

api = pack_module("backends.api")
api_recipes = pack_module("backends.api.diffusers_recipes")
errors = pack_module("backends.engine.errors")
modules = pack_module("backends.engine.modules")

# Every family at 4 bits (final projection kept) and some at 8. K-quants (a slow scale search
# on a CPU) run in the README example's test.
CASES = [("sd3", "gguf:Q4_0"), ("unet", "gguf:Q4_0"), ("pixart", "gguf:Q4_0"), ("flux", "gguf:Q4_0"),
         ("auraflow", "gguf:Q4_0"), ("clip", "gguf:Q4_0"), ("t5", "gguf:Q4_0"),
         ("sd3", "gguf:Q8_0"), ("unet", "gguf:Q8_0"), ("t5", "gguf:Q8_0"),
         ("clip", "torchao:int8wo"), ("pixart", "torchao:int8wo")]
GGUF_CASES = [case for case in CASES if case[1].startswith("gguf:")]


def _ids(cases):
    return [f"{family}-{fmt}" for family, fmt in cases]


def _param_bytes(model: nn.Module) -> int:
    return sum(p.nelement() * p.element_size() for p in model.parameters())


@functools.lru_cache(maxsize=None)
def _quantized(family: str, format_id: str):
    """(float source, quantized copy, report) of the family's tiny model, built once."""
    source = tiny.BUILDERS[family]()
    model = copy.deepcopy(source)
    report = api.quantize(model, format_id, run_device="cpu")
    return source, model, report


def _recipe(source):
    return api_recipes.RECIPE_BY_CLASS[type(source).__name__]


@pytest.mark.parametrize("family,format_id", CASES, ids=_ids(CASES))
def test_output_within_the_formats_band_of_the_float_component(family, format_id):
    """Shown able to fail: the t5 recipe's keep pattern for `wo` removed -> "t5 gguf:Q4_0:
    output error 0.07740 outside its physics band 0.01201-0.03843" (transformers casts wo's
    input to the uint8 payload's dtype); resolve_recipe never looking at the class table
    -> "assert 'generic' == 'sd3'"."""
    source, model, report = _quantized(family, format_id)
    assert report.recipe == _recipe(source).name
    layers = recipe_checked_layers(model, source, format_id, _recipe(source))
    assert layers, "the tiny model is wide enough for the recipe to quantize something"
    kwargs = tiny.inputs(family)
    reference = tiny.output(source, kwargs)
    got = tiny.output(model, kwargs)
    noisy = copy.deepcopy(source)
    floor = noise_floor_error(noisy, layers, lambda: tiny.output(noisy, kwargs), reference)
    err = rel_err(got, reference)
    print(f"{family} {format_id}: output error {err:.5f}, noise floor {floor:.5f} ({err / floor:.2f}x)")
    assert torch.isfinite(got).all()
    assert_in_band(f"{family} {format_id}", err, floor)


@pytest.mark.parametrize("family,format_id", GGUF_CASES, ids=_ids(GGUF_CASES))
def test_bytes_are_what_the_format_promises(family, format_id):
    """GGUF blocks store exactly bits_per_weight per weight: the quantized copy holds the
    source's bytes with each quantized weight replaced by numel * bits / 8, counted here
    from the source model and the format's table. Shown able to fail: quantize_tree's
    record_other without its de-duplication -> t5 cases "assert 10721536 == 10606848"
    (report.bytes_before counted T5's tied embedding twice)."""
    source, model, report = _quantized(family, format_id)
    layers = expected_quantized_layers(source, format_id, _recipe(source))
    named = dict(source.named_modules())
    float_weights = sum(_param_bytes_of(named[name].weight) for name in layers)
    packed = sum(named[name].weight.nelement() * spec.bits_per_weight / 8 for name, spec in layers.items())
    expected = _param_bytes(source) - float_weights + packed
    print(f"{family} {format_id}: {_param_bytes(source)} -> {_param_bytes(model)} bytes "
          f"(quantized weights {float_weights} -> {packed:.0f})")
    assert _param_bytes(model) == expected
    assert report.bytes_before == _param_bytes(source)
    assert report.bytes_after == _param_bytes(model)


def _param_bytes_of(t: torch.Tensor) -> int:
    return t.nelement() * t.element_size()


def test_quantizes_in_place_and_returns_the_report():
    """Shown able to fail: module.py's quantize() run on copy.deepcopy(module) -> the
    module's to_q is still an nn.Linear."""
    model = tiny.BUILDERS["pixart"]()
    block = model.transformer_blocks[0]
    report = api.quantize(model, "gguf:Q8_0", run_device="cpu")
    assert model.transformer_blocks[0] is block
    assert isinstance(block.attn1.to_q, modules.QuantizedLayer)
    assert report.target == "PixArtTransformer2DModel" and report.format_id == "gguf:Q8_0"
    assert report.count("quantized") == sum(isinstance(m, modules.QuantizedLayer) for m in model.modules())


def test_a_bare_layer_is_refused_with_what_to_do():
    """Shown able to fail: the QUANTIZABLE check removed from module.py -> "DID NOT RAISE"
    (quantize_tree sets a child named '' and the layer stays float, silently)."""
    with pytest.raises(errors.QuantKitError, match=r"Sequential"):
        api.quantize(nn.Linear(512, 512), "gguf:Q8_0", run_device="cpu")


def test_weights_on_the_meta_device_are_refused_with_what_to_do():
    """Shown able to fail: the meta check removed from module.py -> "Quantizing layer '0'
    (512, 512) to gguf:Q8_0 failed: NotImplementedError: Cannot copy out of meta tensor"
    (no word of offloading: the pattern does not match)."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(512, 512))
    with pytest.raises(errors.QuantKitError, match=r"enable_sequential_cpu_offload"):
        api.quantize(model, "gguf:Q8_0", run_device="cpu")


def test_a_named_or_given_recipe_replaces_the_class_choice():
    """Shown able to fail: resolve_recipe ignoring its `recipe` argument -> "assert 'sd3' ==
    'generic'"."""
    model = tiny.BUILDERS["sd3"]()
    assert api.quantize(copy.deepcopy(model), "gguf:Q8_0", "generic", run_device="cpu").recipe == "generic"
    mine = api.Recipe("mine", keep=(r"^transformer_blocks\.",))
    report = api.quantize(model, "gguf:Q8_0", mine, run_device="cpu")
    assert report.recipe == "mine"
    assert not any(isinstance(m, modules.QuantizedLayer) for m in model.transformer_blocks.modules())
    with pytest.raises(errors.UnknownRecipe, match=r"Known: unet, sd3"):
        api.quantize(model, "gguf:Q8_0", "sd3_comfy", run_device="cpu")
