"""A digest of every tensor a model holds (not a sample): names, dtypes, shapes and bytes,
and, for a ComfyUI MODEL or CLIP, what its patcher adds on top: weight patches (LoRA),
object patches, weight wrappers and model_options. Two digests are equal exactly when all
of it is the same (tensors bit for bit; other objects by identity)."""
from __future__ import annotations

import hashlib

import torch


def _module_and_patcher(obj):
    """(module or state dict, its ComfyUI patcher or None) for a module, patcher, CLIP or
    state dict."""
    if hasattr(obj, "cond_stage_model"):  # CLIP
        return obj.cond_stage_model, getattr(obj, "patcher", None)
    if hasattr(obj, "model") and hasattr(obj, "model_size"):  # ModelPatcher
        return obj.model, obj
    return obj, None


PATCHER_STATE = ("patches", "object_patches", "weight_wrapper_patches", "model_options")


def _feed(h, value) -> None:
    """Adds a nested value to the hash: containers by content, tensors by bytes, plain
    values by repr, anything else (functions, wrappers) by type and identity."""
    if isinstance(value, torch.Tensor):
        h.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        h.update(tensor_bytes(value))
    elif isinstance(value, dict):
        h.update(b"{")
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            _feed(h, value[key])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for item in value:
            _feed(h, item)
        h.update(b"]")
    elif value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype, torch.device)):
        h.update(repr(value).encode())
    elif hasattr(value, "weights") and type(value).__module__.startswith("comfy."):  # a LoRA adapter
        h.update(type(value).__qualname__.encode())
        _feed(h, value.weights)
    else:
        h.update(f"<{type(value).__qualname__}@{id(value)}>".encode())


def tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def state_digest(obj) -> str:
    """sha256 over all tensors of a module, patcher, CLIP or state dict, in key order, and a
    patcher's PATCHER_STATE."""
    h = hashlib.sha256()
    module, patcher = _module_and_patcher(obj)
    state = module.state_dict() if isinstance(module, torch.nn.Module) else module
    for key, t in sorted(state.items()):
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    for name in PATCHER_STATE if patcher is not None else ():
        h.update(name.encode())
        _feed(h, getattr(patcher, name, None))
    return h.hexdigest()
