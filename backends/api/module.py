"""quantize(): the Linear and Conv layers of any torch module, in place, outside ComfyUI."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from ..engine.errors import QuantKitError
from ..engine.quantize import QUANTIZABLE, quantize_tree
from ..engine.recipes import Recipe
from ..engine.report import QuantReport
from .diffusers_recipes import resolve_recipe


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantize(module: nn.Module, format_id: str, recipe: Union[str, Recipe, None] = None, *,
             exclude: Optional[str] = None, run_device=None, work_device=None,
             name: Optional[str] = None) -> QuantReport:
    """Replaces the Linear and Conv layers of `module` by quantized ones, in place (as
    torchao's quantize_), and returns what was done: a QuantReport (each layer's action and
    reason, bytes before and after; `.summary()` says it in one line).

    format_id: "gguf:Q4_K", "torchao:int8wo", ... (backends.api.all_format_ids()).
    recipe: which layers stay in high precision. None chooses by the module's class
    (diffusers' UNet, SD3, PixArt, Flux and AuraFlow models, transformers' CLIP and T5
    encoders; any other class gets the generic recipe, with a warning); or a name from
    backends.api.RECIPES; or a Recipe.
    exclude: a regular expression of further layer names to keep, e.g. "attn2|proj_out".
    run_device: where the model will compute, checked against the format's needs (default:
    CUDA when there is a GPU, else the CPU). work_device: where the quantization math runs,
    one layer at a time (default: the same). Quantized weights stay on the device their
    float weights were on; move the module afterwards as usual (`.to("cuda")`).
    """
    if isinstance(module, QUANTIZABLE):
        raise QuantKitError(f"quantize() replaces the layers inside a module, and a bare "
                            f"{type(module).__name__} cannot replace itself. Wrap it: "
                            f"quantize(torch.nn.Sequential(layer), ...), then use [0] of the result.")
    for layer_name, layer in module.named_modules():
        if isinstance(layer, QUANTIZABLE) and layer.weight.device.type == "meta":
            raise QuantKitError(
                f"Layer '{layer_name}' of {type(module).__name__} has no weight in memory (it is "
                f"on the 'meta' device: offloaded by accelerate, or not loaded yet), so it cannot "
                f"be quantized. Quantize before enable_sequential_cpu_offload() or a device_map; "
                f"enable_model_cpu_offload() may come before or after.")
    chosen = resolve_recipe(module, recipe)
    run_device = default_device() if run_device is None else torch.device(run_device)
    work_device = run_device if work_device is None else torch.device(work_device)
    return quantize_tree(module, format_id, chosen, target=name or type(module).__name__,
                         exclude=exclude, run_device=run_device, work_device=work_device)
