"""ComfyUI's own quantized layout (engine/native_export.py), pure torch: what each layer's
entries hold and that weight x weight_scale gives the float weight back. That stock ComfyUI
loads such a checkpoint is tested in test_nodes/test_save_quantized_model.py."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from conftest import pack_module

native = pack_module("backends.engine.native_export")
registry = pack_module("backends.engine.registry")
modules = pack_module("backends.engine.modules")
errors = pack_module("backends.engine.errors")


@pytest.mark.parametrize("fmt, dtype, bound", [("int8_tensorwise", torch.int8, 0.5 / 127),
                                               ("float8_e4m3fn", torch.float8_e4m3fn, 1 / 16)],
                         ids=["int8_tensorwise", "float8_e4m3fn"])
def test_a_saved_layer_holds_the_weight_at_one_scale(fmt, dtype, bound):
    """weight x weight_scale is the float weight within half a step (int8) or fp8's 3-bit
    mantissa; the largest magnitude uses the whole range; comfy_quant names the format; the
    state dict keeps the bias and the layers around the quantized one.
    Shown able to fail: `scale = (qmax / w.abs().amax())` (the reciprocal) in native_layer
    -> every stored weight rounds to 0: error 0.125, the whole peak (int8: > 0.0005;
    fp8: > 0.0078)."""
    adapter, spec = registry.get_format("torchao:int8wo")
    lin = nn.Linear(64, 32)
    root = nn.Sequential(modules.make_quantized(lin, adapter, spec, adapter.quantize(lin.weight.detach(), spec),
                                                lin.bias.detach()), nn.LayerNorm(32))
    sd = native.native_state_dict(root, fmt)
    assert set(sd) == {"0.weight", "0.weight_scale", "0.comfy_quant", "0.bias", "1.weight", "1.bias"}
    assert sd["0.weight"].dtype == dtype and sd["0.weight_scale"].shape == ()
    assert json.loads(bytes(sd["0.comfy_quant"].tolist())) == {"format": fmt}
    w = root[0].dequantized_weight(torch.float32)
    back = sd["0.weight"].float() * sd["0.weight_scale"]
    peak = w.abs().amax()
    assert (back - w).abs().max() <= bound * peak * 1.001
    assert sd["0.weight"].float().abs().max() == native.NATIVE_FORMATS[fmt][1]
    assert torch.equal(sd["0.bias"], lin.bias.detach()) and torch.equal(sd["1.weight"], root[1].weight)


def test_a_tree_without_quantized_layers_or_an_unknown_layout_is_refused():
    with pytest.raises(errors.FormatUnsupported, match="holds no quantized layer"):
        native.native_state_dict(nn.Sequential(nn.Linear(4, 4)), "int8_tensorwise")
    with pytest.raises(errors.FormatUnsupported, match="'nvfp4' is not one of ComfyUI's layouts"):
        native.native_state_dict(nn.Sequential(nn.Linear(4, 4)), "nvfp4")
