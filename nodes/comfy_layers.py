"""The ComfyUI side of a quantized layer and model: the attributes ComfyUI's loader sets
on layers (low-VRAM casting, weight functions) and a ModelPatcher that applies LoRA and
other weight patches to quantized layers on the fly instead of writing into them."""
from __future__ import annotations

import uuid

import comfy.lora
import comfy.model_patcher
import comfy.utils

from ..backends.modules import QuantizedConv, QuantizedLayer, QuantizedLinear


class _ComfyHooks:
    """ComfyUI marks layers it may stream from RAM with `comfy_cast_weights` and hangs
    weight functions (LoRA in low-VRAM mode) on `weight_function`/`bias_function`.
    Our layers always stream their parts to the input's device, so the flag is a marker."""

    comfy_cast_weights = False

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


class OnTheFlyPatch:
    """Applies ComfyUI weight patches (LoRA, LoHa, diff, ...) to a dequantized weight at
    compute time; the quantized storage itself is never rewritten."""

    def __init__(self, key, patches):
        self.key = key
        self.patches = patches

    def __call__(self, weight):
        return comfy.lora.calculate_weight(self.patches[self.key], weight, self.key,
                                           intermediate_dtype=weight.dtype)


def _quantized_owner(model, key):
    module_name, _, attr = key.rpartition(".")
    if attr != "weight" or not module_name:
        return None
    try:
        module = comfy.utils.get_attr(model, module_name)
    except AttributeError:
        return None
    return module if isinstance(module, QuantizedLayer) else None


class QuantModelPatcherMixin:
    """Mixed into whatever ModelPatcher class the source model used."""

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        owner = _quantized_owner(self.model, key)
        if owner is None:
            return super().patch_weight_to_device(key, device_to=device_to, inplace_update=inplace_update)
        if key not in self.patches:
            return
        owner.weight_function = [f for f in owner.weight_function if not isinstance(f, OnTheFlyPatch)]
        owner.weight_function.append(OnTheFlyPatch(key, self.patches))

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for m in self.model.modules():
                if isinstance(m, QuantizedLayer):
                    m.weight_function = [f for f in m.weight_function if not isinstance(f, OnTheFlyPatch)]
        return super().unpatch_model(device_to=device_to, unpatch_weights=unpatch_weights)


_PATCHER_CLASSES = {}


def quant_patcher_class(base_cls):
    if issubclass(base_cls, QuantModelPatcherMixin):
        return base_cls
    if base_cls not in _PATCHER_CLASSES:
        _PATCHER_CLASSES[base_cls] = type(f"QuantKit{base_cls.__name__}",
                                          (QuantModelPatcherMixin, base_cls), {})
    return _PATCHER_CLASSES[base_cls]


def adopt_patcher(source, new_model, dropped_patch_keys=()):
    """A patcher for `new_model` carrying the source's options and remaining patches; the
    source patcher and its model are left as they were."""
    n = source.clone()
    n.__class__ = quant_patcher_class(type(source))
    n.model = new_model
    n.size = 0
    n.backup = {}
    n.object_patches_backup = {}
    n.hook_backup = {}
    n.cached_hook_patches = {}
    n.pinned = set()
    n.parent = None
    for key in dropped_patch_keys:
        n.patches.pop(key, None)
    n.patches_uuid = uuid.uuid4()
    return n


def reset_loaded_state(model, device):
    """A cloned model starts unloaded: no low-VRAM hooks, no load bookkeeping."""
    for m in model.modules():
        comfy.model_patcher.wipe_lowvram_weight(m)
        if hasattr(m, "comfy_patched_weights"):
            del m.comfy_patched_weights
    model.model_loaded_weight_memory = 0
    model.lowvram_patch_counter = 0
    model.model_lowvram = False
    model.current_weight_patches_uuid = None
    model.model_offload_buffer_memory = 0
    model.device = device
    if hasattr(model, "current_patcher"):
        model.current_patcher = None
