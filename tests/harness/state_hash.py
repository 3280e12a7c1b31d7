"""A digest of every tensor a model holds (not a sample): names, dtypes, shapes and bytes.
Two digests are equal exactly when the state dicts are bit for bit the same."""
from __future__ import annotations

import hashlib

import torch


def _state_dict(obj) -> dict:
    """A module's state dict; a ComfyUI MODEL (patcher) or CLIP is taken by its model."""
    if hasattr(obj, "cond_stage_model"):  # CLIP
        obj = obj.cond_stage_model
    elif hasattr(obj, "model") and hasattr(obj, "model_size"):  # ModelPatcher
        obj = obj.model
    return obj.state_dict() if isinstance(obj, torch.nn.Module) else obj


def tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def state_digest(obj) -> str:
    """sha256 over all tensors of a module, patcher, CLIP or state dict, in key order."""
    h = hashlib.sha256()
    for key, t in sorted(_state_dict(obj).items()):
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()
