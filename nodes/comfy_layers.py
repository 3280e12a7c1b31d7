"""The ComfyUI side of a quantized layer: the attributes ComfyUI's loader sets on layers
(low-VRAM casting, weight functions such as LoRA in low-VRAM mode)."""
from __future__ import annotations

from ..backends.engine.modules import QuantizedConv, QuantizedLinear


class _ComfyHooks:
    """ComfyUI marks layers it may stream from RAM with `comfy_cast_weights` and hangs
    weight functions (LoRA in low-VRAM mode) on `weight_function`/`bias_function`.
    Our layers always stream their parts to the input's device, so the flag is a marker."""

    comfy_cast_weights = False
    weight_function = []  # as in core's ops: replaced, never mutated, by the loader
    bias_function = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_function = []
        self.bias_function = []

    def weight_hooks(self):
        return self.weight_function

    def bias_hooks(self):
        return self.bias_function


class ComfyQuantizedLinear(_ComfyHooks, QuantizedLinear):
    pass


class ComfyQuantizedConv(_ComfyHooks, QuantizedConv):
    pass


LAYER_CLASSES = (ComfyQuantizedLinear, ComfyQuantizedConv)
