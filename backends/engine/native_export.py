"""A quantized module tree as a checkpoint in ComfyUI's own per-layer quantized layout
(ComfyUI 0.8 and later): each quantized Linear becomes `weight` (fp8 or int8), a per-tensor
`weight_scale` and a `comfy_quant` entry (the layer's config as UTF-8 JSON bytes), which
stock ComfyUI loads with its plain diffusion model loader, no QuantKit needed.

Core's layouts hold one scale per tensor, so every layer is re-quantized from its float
weight (QuantKit's formats keep a scale per row or block). Convolutions stay float: core's
quantized ops cover Linear layers.
"""
from __future__ import annotations

import json

import torch
import torch.nn as nn

from .errors import FormatUnsupported
from .modules import QuantizedConv, QuantizedLayer

# core's format name -> (storage dtype, largest stored magnitude)
NATIVE_FORMATS = {"float8_e4m3fn": (torch.float8_e4m3fn, 448.0), "int8_tensorwise": (torch.int8, 127.0)}


def native_layer(weight: torch.Tensor, fmt: str) -> dict:
    """Float weight -> {weight, weight_scale, comfy_quant} in core's layout."""
    dtype, qmax = NATIVE_FORMATS[fmt]
    w = weight.detach().float()
    scale = (w.abs().amax() / qmax).clamp(min=1e-12)
    q = w / scale
    q = q.round().clamp(-qmax, qmax).to(dtype) if dtype == torch.int8 else q.to(dtype)
    conf = torch.tensor(list(json.dumps({"format": fmt}).encode("utf-8")), dtype=torch.uint8)
    return {"weight": q.contiguous(), "weight_scale": scale.reshape(()), "comfy_quant": conf}


def native_state_dict(root: nn.Module, fmt: str, float_dtype: torch.dtype = torch.bfloat16) -> dict:
    """root's state dict with its quantized Linear layers in core's layout `fmt`; quantized
    convolutions dequantized to float_dtype; everything else as it is."""
    if fmt not in NATIVE_FORMATS:
        raise FormatUnsupported(f"'{fmt}' is not one of ComfyUI's layouts QuantKit writes: "
                                f"{', '.join(NATIVE_FORMATS)}.")
    quantized = {n: m for n, m in root.named_modules() if isinstance(m, QuantizedLayer)}
    if not quantized:
        raise FormatUnsupported("This model holds no quantized layer. Quantize it first "
                                "(Quantize Model), then save it.")
    sd = {}
    for name, layer in quantized.items():
        prefix = f"{name}." if name else ""
        weight = layer.dequantized_weight(torch.float32)
        if isinstance(layer, QuantizedConv):
            sd[prefix + "weight"] = weight.to(float_dtype)
        else:
            sd.update({prefix + k: v for k, v in native_layer(weight, fmt).items()})
        if layer.bias is not None:
            sd[prefix + "bias"] = layer.bias.detach()
    for key, tensor in root.state_dict().items():
        if key.rpartition(".")[0] not in quantized:
            sd[key] = tensor.detach()
    return {k: v.cpu().contiguous() for k, v in sd.items()}
