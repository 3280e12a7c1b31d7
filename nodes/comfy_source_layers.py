"""A source model's layers as ComfyUI built them: which of them are Linear/Conv layers QuantKit
can replace, and each one's true float weight. The one place that knows how core stores a
weight other than as plain floats:
- ComfyUI 0.3.75 `scaled_fp8_ops` (the `*_fp8_scaled` files): a float8 weight and a per-layer
  `scale_weight`; the true weight is weight * scale_weight.
- ComfyUI 0.8+ `mixed_precision_ops` (0.33: comfy-kitchen layouts, also what scaled fp8 files
  are converted to on load): every Linear is a `torch.nn.Module` (not an `nn.Linear`) whose
  weight may be a core `QuantizedTensor`.
Both layer kinds convert their stored weight to float with their own `convert_weight`, the
method ComfyUI's patcher calls before it applies a LoRA; it is used here the same way."""
from __future__ import annotations

import torch
import torch.nn as nn

import comfy.ops

from ..backends.engine.errors import QuantKitError
from ..backends.engine.quantize import QUANTIZABLE


def _is_core_linear(module: nn.Module) -> bool:
    """A Linear of core's mixed-precision ops, which is a plain nn.Module."""
    weight = getattr(module, "weight", None)
    return (isinstance(module, comfy.ops.CastWeightBiasOp) and hasattr(module, "in_features")
            and isinstance(weight, torch.Tensor) and weight.dim() == 2)


def is_layer(module: nn.Module) -> bool:
    """A layer Quantize Model / Quantize Text Encoder replaces."""
    return isinstance(module, QUANTIZABLE) or _is_core_linear(module)


PLAIN_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def is_plain_float(weight: torch.Tensor) -> bool:
    """Stored as plain 16/32-bit floats (not float8, not a tensor subclass)."""
    return type(weight) in (torch.Tensor, nn.Parameter) and weight.dtype in PLAIN_FLOATS


def true_weight(name: str, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """`weight` (a stored weight of `module`, e.g. its unpatched backup) as the values it
    stands for, through the layer's own conversion where it has one (without changing
    `weight`): scaled fp8 -> float32 weight x scale; QuantizedTensor -> dequantized."""
    convert = getattr(module, "convert_weight", None)
    if convert is not None:
        weight = convert(weight.detach(), inplace=False)
    elif getattr(module, "scale_weight", None) is not None:
        raise QuantKitError(
            f"Layer '{name}' stores a scaled {weight.dtype} weight but offers no conversion "
            f"(convert_weight) in this ComfyUI version, so its true values cannot be read. Load "
            f"the model from a 16-bit file, then quantize it.")
    weight = weight.detach()
    if type(weight) is not torch.Tensor:
        raise QuantKitError(
            f"Layer '{name}' holds its weight as {type(weight).__name__}, which QuantKit cannot "
            f"read as float values. Load the model from a 16-bit file, then quantize it.")
    return weight


def stored_as_floats(name: str, module: nn.Module):
    """A kept layer's tensors as floats for a file of floats (.gguf), where the layer stores
    its weight otherwise (scaled fp8, a core QuantizedTensor): the true weight in float32
    (exact for float8 x scale) and the bias, the scales folded in; None for other modules."""
    weight = getattr(module, "weight", None)
    if not is_layer(module) or not isinstance(weight, torch.Tensor) or is_plain_float(weight):
        return None
    out = {"weight": true_weight(name, module, weight).to(torch.float32)}
    if getattr(module, "bias", None) is not None:
        out["bias"] = module.bias.detach()
    return out
