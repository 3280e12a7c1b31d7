"""Write a module tree whose layers are GGUF-quantized as a .gguf file: quantized layers
keep their exact bytes, everything else (kept layers, biases, norms, buffers) is stored in
its own float type (F32, F16 or BF16; other dtypes as F32)."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch.nn as nn

import torch

from ..engine.errors import FormatUnsupported
from .file import write_gguf
from ..engine.modules import QuantizedLayer

OwnFloats = Callable[[str, nn.Module], Optional[Dict[str, torch.Tensor]]]
FLOAT_TYPE_OF = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def float_entry(tensor: torch.Tensor) -> tuple:
    """(qtype, data, shape) storing a float tensor as it is (F32 for other dtypes)."""
    qtype = FLOAT_TYPE_OF.get(tensor.dtype, "F32")
    data = tensor.detach().cpu().contiguous()
    return qtype, data if qtype != "F32" else data.float(), tuple(tensor.shape)


def gguf_tensors(root: nn.Module, own_floats: Optional[OwnFloats] = None) -> dict:
    """name -> (qtype, data, torch shape), in the key layout of root's state_dict.
    own_floats(name, module): a module's tensors as floats where the host stores them
    otherwise (a scaled fp8 layer: its weight x scale, the scale left out), else None."""
    tensors = {}
    quantized = {n: m for n, m in root.named_modules() if isinstance(m, QuantizedLayer)}
    for name, layer in quantized.items():
        if layer.spec.backend != "gguf":
            raise FormatUnsupported(f"Layer {name} is {layer.spec.id}; only gguf:* layers can be "
                                    f"written to a .gguf file. Quantize with a gguf format first.")
        prefix = f"{name}." if name else ""
        tensors[prefix + "weight"] = (layer.spec.name, layer.weight.detach().cpu(), tuple(layer.weight_shape))
        if layer.bias is not None:
            tensors[prefix + "bias"] = float_entry(layer.bias)
    for name, module in root.named_modules():
        if name in quantized or any(name.startswith(q + ".") for q in quantized if q):
            continue
        floats = None if own_floats is None else own_floats(name, module)
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for pname, tensor in (own if floats is None else floats.items()):
            key = f"{name}.{pname}" if name else pname
            tensors[key] = float_entry(tensor)
    return tensors


def save_gguf(root: nn.Module, path, arch: str, metadata: Optional[dict] = None,
              require_quantized: bool = True, own_floats: Optional[OwnFloats] = None) -> dict:
    tensors = gguf_tensors(root, own_floats)
    if require_quantized and not any(qtype not in FLOAT_TYPE_OF.values() for qtype, _, _ in tensors.values()):
        raise FormatUnsupported("This model holds no GGUF-quantized layer, so a .gguf file would "
                                "only repeat its float weights. Quantize it with a gguf:* format "
                                "first (Quantize Model), or load a .gguf file.")
    write_gguf(path, tensors, metadata or {}, arch=arch)
    return tensors


def describe(tensors: dict) -> str:
    """'12 F32, 40 Q8_0': how many tensors of each type a file holds."""
    counts: dict = {}
    for qtype, _, _ in tensors.values():
        counts[qtype] = counts.get(qtype, 0) + 1
    return ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
