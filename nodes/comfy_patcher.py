"""The ModelPatcher of a quantized model, and the one place where QuantKit relies on
ComfyUI's patcher internals (attribute names its loaders set, the fields `clone()`
carries). Tested on ComfyUI 0.3.75 and 0.33 (see the README's compatibility table).

Quantized models always get the classic ModelPatcher, also where Dynamic VRAM is the
default (ComfyUI >= 0.16 on NVIDIA): the dynamic loader streams one float (or core
QuantizedTensor) weight per layer through comfy-aimdo's buffers and core's cast ops,
while a QuantKit layer holds several packed tensors and dequantizes them itself. The
classic loader does what these layers need (full or partial loading, LoRA through
weight functions, device moves) and ComfyUI mixes both kinds of patcher in one graph, as
it does for TorchCompileModel's output."""
from __future__ import annotations

import copy
import inspect

import torch

import comfy.lora
import comfy.model_patcher
import comfy.utils

from ..backends.engine.modules import QuantizedLayer

# What ComfyUI's loaders (classic and dynamic) set on a model or its modules while it is
# loaded. A quantized copy starts without any of it: its own patcher sets it afresh.
LOADER_STATE = frozenset({
    "weight_function", "bias_function", "weight_lowvram_function", "bias_lowvram_function",
    "prev_comfy_cast_weights", "comfy_cast_weights", "comfy_force_cast_weights",
    "comfy_patched_weights", "seed_key", "model_loaded_weight_memory", "lowvram_patch_counter",
    "model_lowvram", "current_weight_patches_uuid", "model_offload_buffer_memory",
    # Dynamic VRAM (0.16+): aimdo buffers, pins and prefetch state
    "dynamic_vbars", "dynamic_pins", "dynamic_patchers", "_v", "_pin_state", "_prefetch",
    "_comfy_graph",
})
# Loader state the model's own constructor sets: reset to that value rather than dropped.
LOADER_STATE_DEFAULTS = {"current_patcher": None}
LOADER_STATE_PREFIXES = ("_v_",)  # _v_signature, _v_block, _v_weight, ...


def is_loader_state(attr: str) -> bool:
    return attr in LOADER_STATE or attr.startswith(LOADER_STATE_PREFIXES)


def reset_loader_state_defaults(model) -> None:
    for attr, value in LOADER_STATE_DEFAULTS.items():
        if attr in model.__dict__:
            setattr(model, attr, value)


def settle_stored_dtypes(model) -> None:
    """Under Dynamic VRAM core's layers keep the file's dtype and cast at run time to
    `<name>_comfy_model_dtype` (e.g. fp16 weights of a model run with --bf16-unet); the
    classic patcher of a quantized copy does no such cast, so its float tensors are
    stored in the model dtype, as the classic loader would have built them."""
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                dtype = getattr(module, f"{name}_comfy_model_dtype", None)
                if t is None or dtype is None or t.dtype == dtype or not t.is_floating_point():
                    continue
                with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable in any mode
                    converted = t.detach().to(dtype)
                table[name] = torch.nn.Parameter(converted, requires_grad=False) if table is module._parameters else converted


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


def _without_on_the_fly(functions):
    return [f for f in functions if not isinstance(f, OnTheFlyPatch)]


class QuantModelPatcher(comfy.model_patcher.ModelPatcher):
    """Weight patches on a quantized layer become an on-the-fly function on that layer;
    everything else is ComfyUI's own behaviour."""

    def patch_weight_to_device(self, key, device_to=None, *args, **kwargs):
        owner = _quantized_owner(self.model, key)
        if owner is None:
            return super().patch_weight_to_device(key, device_to, *args, **kwargs)
        if kwargs.get("return_weight"):  # 0.33: the patched float weight, nothing installed
            weight = owner.dequantized_weight(device=device_to)
            return OnTheFlyPatch(key, self.patches)(weight) if key in self.patches else weight
        if key not in self.patches:
            return None
        owner.weight_function = _without_on_the_fly(owner.weight_function) + [OnTheFlyPatch(key, self.patches)]
        return None

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for m in self.model.modules():
                if isinstance(m, QuantizedLayer):
                    m.weight_function = _without_on_the_fly(m.weight_function)
        return super().unpatch_model(device_to=device_to, unpatch_weights=unpatch_weights)


def classic_patcher_kwargs(loader) -> dict:
    """Keyword arguments that make one of ComfyUI's model loaders build a classic patcher
    (0.33: `disable_dynamic=True`; older versions build nothing else)."""
    return {"disable_dynamic": True} if "disable_dynamic" in inspect.signature(loader).parameters else {}


def set_reload_recipe(patcher, factory, args) -> None:
    """0.33+: ComfyUI makes a copy of a model with weights of its own (multi-GPU deep
    clones, `clone(disable_dynamic=True)`) by calling the loader again, as recorded in
    `cached_patcher_init`; a quantized model records a factory that loads and quantizes
    again. `factory(*args, disable_dynamic=...)` returns the new patcher. Older ComfyUI
    has no such field and gets none."""
    if hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = (factory, tuple(args))


def _copy_model_options(options):
    deepcopy = getattr(comfy.utils, "deepcopy_list_dict", None)  # 0.33: keeps tensors shared
    return deepcopy(options) if deepcopy is not None else copy.deepcopy(options)


def new_quantized_patcher(source, model, dropped_patch_keys=()) -> QuantModelPatcher:
    """A new patcher for `model` on the source's devices, carrying the options users and
    nodes set on the source (patches, model options, wrappers, callbacks, attachments,
    hooks) the way `clone()` carries them, and none of its loader state."""
    n = QuantModelPatcher(model, source.load_device, source.offload_device,
                          weight_inplace_update=source.weight_inplace_update)
    n.patches = {k: v[:] for k, v in source.patches.items() if k not in set(dropped_patch_keys)}
    n.object_patches = dict(source.object_patches)
    n.weight_wrapper_patches = dict(source.weight_wrapper_patches)
    n.model_options = _copy_model_options(source.model_options)
    n.force_cast_weights = source.force_cast_weights
    n.attachments = {k: (a.on_model_patcher_clone() if hasattr(a, "on_model_patcher_clone") else a)
                     for k, a in source.attachments.items()}
    n.additional_models = {k: [m.clone() for m in ms] for k, ms in source.additional_models.items()}
    n.callbacks = {k: {k1: list(c1) for k1, c1 in c.items()} for k, c in source.callbacks.items()}
    n.wrappers = {k: {k1: list(w1) for k1, w1 in w.items()} for k, w in source.wrappers.items()}
    n.injections = {k: list(i) for k, i in source.injections.items()}
    n.hook_patches = comfy.model_patcher.create_hook_patches_clone(source.hook_patches)
    n.forced_hooks = source.forced_hooks.clone() if source.forced_hooks else None
    n.is_clip = source.is_clip
    n.hook_mode = source.hook_mode
    return n
