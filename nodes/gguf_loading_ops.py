"""ComfyUI operations used while a GGUF file's diffusion model is built: Linear/Conv layers
take no memory until loaded, keep quantized tensors by reference, and are then swapped for
quantized layers. Built per load by a factory (no state on shared classes)."""
from __future__ import annotations

import torch
import torch.nn as nn

import comfy.ops

from ..backends.engine.errors import MalformedFile


def _lazy(base):
    class Lazy(base):
        def __init__(self, *args, device=None, dtype=None, **kwargs):
            super().__init__(*args, device="meta", dtype=dtype, **kwargs)
            self.has_bias = self.bias is not None
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
            self.gguf_weight = None  # the state-dict key of a quantized weight
            self.gguf_source = None  # the tensor the weight came from (placeholder or float)

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                                  missing_keys, unexpected_keys, error_msgs):
            for name in ("weight", "bias"):
                key = prefix + name
                if key not in state_dict:
                    if name == "weight" or self.has_bias:
                        missing_keys.append(key)
                    continue
                tensor = state_dict[key]
                if name == "weight":
                    self.gguf_source = tensor
                if tensor.is_meta:  # a quantized tensor's placeholder
                    if name != "weight":
                        raise MalformedFile(f"{key} is quantized; only weights may be. "
                                            f"Convert the model again keeping biases in F16/F32.")
                    self.gguf_weight = key
                else:
                    setattr(self, name, nn.Parameter(tensor, requires_grad=False))

    Lazy.__name__ = base.__name__
    return Lazy


def gguf_loading_ops():
    class Ops(comfy.ops.manual_cast):
        Linear = _lazy(comfy.ops.manual_cast.Linear)
        Conv1d = _lazy(comfy.ops.manual_cast.Conv1d)
        Conv2d = _lazy(comfy.ops.manual_cast.Conv2d)
        Conv3d = _lazy(comfy.ops.manual_cast.Conv3d)
    return Ops


def lazy_layers(root: nn.Module):
    """(name, module) of layers still waiting for a quantized weight."""
    return [(n, m) for n, m in root.named_modules() if getattr(m, "gguf_weight", None)]


def placeholder(shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")
