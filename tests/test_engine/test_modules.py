"""Quantized layers (engine/modules.py) under Module.to(dtype): the format's stored parts keep
their dtype (diffusers' pipe.to(torch.bfloat16), .half() cast every floating tensor)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import pack_module
from harness.draws import gaussian
from harness.formats import cpu_format_ids

modules = pack_module("backends.engine.modules")
quantize = pack_module("backends.engine.quantize")
recipes = pack_module("backends.engine.recipes")
registry = pack_module("backends.engine.registry")
base = pack_module("backends.engine.base")

FORMATS = cpu_format_ids(registry, base.hardware_problem)


@pytest.mark.parametrize("format_id", FORMATS)
def test_a_dtype_cast_leaves_the_stored_parts_and_the_output_as_they_were(format_id):
    """Only the bias follows the cast, and the layer casts its bias to the input's dtype
    anyway: bfloat16 input gives the same output before and after. Shown able to fail:
    QuantizedLayer._apply removed -> "torchao:fp8wo: weight float8_e4m3fn -> bfloat16"
    (and the scale of every 8-bit torchao/quanto/bnb format: float32 -> bfloat16)."""
    model = nn.Sequential(nn.Linear(512, 256))
    with torch.no_grad():
        model[0].weight.copy_(gaussian((256, 512)))
    quantize.quantize_tree(model, format_id, recipes.get_recipe("generic"), target="test")
    layer = model[0]
    assert isinstance(layer, modules.QuantizedLayer)
    before = {name: t.clone() for name, t in layer.parts().items()}
    x = gaussian((4, 512), seed=3).to(torch.bfloat16) * 50
    with torch.no_grad():
        y_before = model(x)
    model.to(torch.bfloat16)
    for name, t in layer.parts().items():
        assert t.dtype == before[name].dtype, f"{format_id}: {name} {before[name].dtype} -> {t.dtype}"
        assert torch.equal(t, before[name]), f"{format_id}: {name} changed"
    assert layer.bias.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(model(x), y_before)
