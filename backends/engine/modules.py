"""Modules that hold a quantized weight as plain parameters and compute through a backend.

The parts of a quantized weight are registered as parameters ("weight" is the packed
payload, the rest are "weight_<part>"), so that `state_dict()` byte counts are what is
really stored and `Module.to(device)` moves everything. A weight that lives on another
device than the input (offloaded) is streamed to the input's device for the call.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import BackendAdapter, FormatSpec

WeightHook = Callable[[torch.Tensor], torch.Tensor]


def _part_param_name(part: str) -> str:
    return "weight" if part == "weight" else f"weight_{part}"


class QuantizedLayer(nn.Module):
    """Common part of QuantizedLinear and QuantizedConv."""

    decode_group = None  # set by decode_groups.link_decode_groups: decodes with its neighbours
    decode_index = 0

    def __init__(self, adapter: BackendAdapter, spec: FormatSpec, shape, parts: dict,
                 bias: Optional[torch.Tensor]):
        super().__init__()
        self.adapter = adapter
        self.spec = spec
        self.weight_shape = torch.Size(shape)
        self._part_names = tuple(parts)
        for part, tensor in parts.items():
            self.register_parameter(_part_param_name(part), nn.Parameter(tensor, requires_grad=False))
        if bias is not None:
            self.bias = nn.Parameter(bias.detach(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # Hooks a host (ComfyUI's low-VRAM loader, LoRA) may set: applied to the float weight.
    def weight_hooks(self) -> List[WeightHook]:
        return []

    def bias_hooks(self) -> List[WeightHook]:
        return []

    def parts(self, device: Optional[torch.device] = None) -> dict:
        out = {}
        for part in self._part_names:
            t = getattr(self, _part_param_name(part))
            if device is not None and t.device != device:
                t = t.to(device, non_blocking=True)
            out[part] = t
        return out

    def dequantized_weight(self, dtype: torch.dtype = torch.float32,
                           device: Optional[torch.device] = None) -> torch.Tensor:
        """The float weight (for LoRA, checks, saving), hooks not applied."""
        return self.adapter.dequantize(self.parts(device), self.spec, self.weight_shape, dtype)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) (diffusers' pipe.to(torch.bfloat16), .half()) casts every floating
        # tensor: it would turn a float8 payload or float32 scales into the new dtype, changing
        # the format and its bytes. The parts keep their dtype and follow device moves only.
        part_ids = {id(getattr(self, _part_param_name(p))) for p in self._part_names}

        def parts_keep_dtype(t):
            out = fn(t)
            if id(t) in part_ids and out.dtype != t.dtype:
                return t.data.to(out.device)
            return out

        return super()._apply(parts_keep_dtype, recurse)

    def stored_bytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in self.parameters())

    def _bias_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        b = self.bias
        if b is None:
            return None
        b = b.to(device=x.device, dtype=x.dtype, non_blocking=True)
        for hook in self.bias_hooks():
            b = hook(b)
        return b

    def _grouped_weight(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The weight as its decode group decoded it (no hooks), or None."""
        group = self.decode_group
        if group is None or torch.compiler.is_compiling():  # inductor fuses the decoders itself
            return None
        return group.weight(self.decode_index, self, x)

    def _weight_for(self, x: torch.Tensor) -> torch.Tensor:
        w = self.adapter.dequantize(self.parts(x.device), self.spec, self.weight_shape, x.dtype)
        for hook in self.weight_hooks():
            w = hook(w)
        return w.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.spec.id}, shape={tuple(self.weight_shape)}, bias={self.bias is not None}"


def _cpu_half(x: torch.Tensor) -> bool:
    # CPUs have no fast float16 matrix kernels: compute in float32 and round back.
    return x.device.type == "cpu" and x.dtype == torch.float16


class QuantizedLinear(QuantizedLayer):
    def __init__(self, adapter, spec, shape, parts, bias):
        super().__init__(adapter, spec, shape, parts, bias)
        self.out_features, self.in_features = int(shape[0]), int(shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_half(x):
            return self.forward(x.float()).to(x.dtype)
        if self.weight_hooks():
            return F.linear(x, self._weight_for(x), self._bias_for(x))
        w = self._grouped_weight(x)
        if w is not None:
            return F.linear(x, w, self._bias_for(x))
        return self.adapter.linear(x, self.parts(x.device), self.spec, self.weight_shape,
                                   self._bias_for(x))


class QuantizedConv(QuantizedLayer):
    """Conv1d/2d/3d: the weight is dequantized for the call (no fused conv kernels)."""

    _CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}

    def __init__(self, adapter, spec, shape, parts, bias, conv: nn.modules.conv._ConvNd):
        super().__init__(adapter, spec, shape, parts, bias)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = getattr(conv, "_reversed_padding_repeated_twice", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_half(x):
            return self.forward(x.float()).to(x.dtype)
        conv = self._CONV[len(self.weight_shape)]
        w = None if self.weight_hooks() else self._grouped_weight(x)
        w = self._weight_for(x) if w is None else w
        b = self._bias_for(x)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(x, w, b, self.stride, 0, self.dilation, self.groups)
        return conv(x, w, b, self.stride, self.padding, self.dilation, self.groups)


def make_quantized(module: nn.Module, adapter: BackendAdapter, spec: FormatSpec, parts: dict,
                   bias: Optional[torch.Tensor], layer_cls=None, shape=None) -> QuantizedLayer:
    """A quantized stand-in for `module` (a Linear or Conv). `layer_cls` lets a host
    supply subclasses with its own hooks; `shape` is the float weight's when the module
    holds none (a layer read from a quantized file)."""
    shape = module.weight.shape if shape is None else torch.Size(shape)
    if not isinstance(module, nn.modules.conv._ConvNd):  # nn.Linear, or a host's own Linear
        cls = layer_cls[0] if layer_cls else QuantizedLinear
        return cls(adapter, spec, shape, parts, bias)
    cls = layer_cls[1] if layer_cls else QuantizedConv
    return cls(adapter, spec, shape, parts, bias, module)
