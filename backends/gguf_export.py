"""Write a module tree whose layers are GGUF-quantized as a .gguf file: quantized layers
keep their exact bytes, everything else (biases, norms, buffers) is stored as F32."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .errors import FormatUnsupported
from .gguf_file import write_gguf
from .modules import QuantizedLayer


def gguf_tensors(root: nn.Module) -> dict:
    """name -> (qtype, data, torch shape), in the key layout of root's state_dict."""
    tensors = {}
    quantized = {n: m for n, m in root.named_modules() if isinstance(m, QuantizedLayer)}
    for name, layer in quantized.items():
        if layer.spec.backend != "gguf":
            raise FormatUnsupported(f"Layer {name} is {layer.spec.id}; only gguf:* layers can be "
                                    f"written to a .gguf file. Quantize with a gguf format first.")
        prefix = f"{name}." if name else ""
        tensors[prefix + "weight"] = (layer.spec.name, layer.weight.detach().cpu(), tuple(layer.weight_shape))
        if layer.bias is not None:
            tensors[prefix + "bias"] = ("F32", layer.bias.detach().float().cpu(), tuple(layer.bias.shape))
    for name, module in root.named_modules():
        if name in quantized or any(name.startswith(q + ".") for q in quantized if q):
            continue
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for pname, tensor in own:
            key = f"{name}.{pname}" if name else pname
            tensors[key] = ("F32", tensor.detach().float().cpu().contiguous(), tuple(tensor.shape))
    return tensors


def save_gguf(root: nn.Module, path, arch: str, metadata: Optional[dict] = None) -> dict:
    tensors = gguf_tensors(root)
    write_gguf(path, tensors, metadata or {}, arch=arch)
    return tensors
