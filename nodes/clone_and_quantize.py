"""Shared by Quantize Model and Quantize Text Encoder: clone a patcher's model (sharing
weight storage), quantize chosen subtrees of the clone, and wrap it in a new patcher.
The source patcher, its model and ComfyUI's cache of them are never modified."""
from __future__ import annotations

import torch

import comfy.lora
import comfy.model_management
import comfy.utils

from ..backends.engine.clone import clone_tree
from ..backends.engine.errors import QuantKitError
from ..backends.engine.quantize import quantize_tree
from ..backends.engine.recipes import get_recipe
from .comfy_layers import LAYER_CLASSES
from .comfy_source_layers import is_layer, true_weight
from .comfy_patcher import (is_loader_state, new_quantized_patcher, reset_loader_state_defaults,
                            set_reload_recipe, settle_stored_dtypes)

QUANTIZE_ON = ["auto", "cpu", "gpu"]


def work_device(choice: str) -> torch.device:
    gpu = comfy.model_management.get_torch_device()
    if choice == "cpu" or (choice == "auto" and gpu.type == "cpu"):
        return torch.device("cpu")
    if gpu.type == "cpu":
        raise QuantKitError("'quantize_on' is 'gpu' but ComfyUI runs on the CPU here. "
                            "Choose 'auto' or 'cpu'.")
    return gpu


def quantize_patcher(source, targets, format_id: str, exclude: str, quantize_on: str, plans=None):
    """targets: list of (subtree attribute path in source.model, recipe name, label).
    plans: {path: LayerPlan} for targets quantized a format per layer (format_id then labels
    them). Returns (new patcher, list of QuantReport)."""
    device = work_device(quantize_on)
    root = source.model
    backup = source.backup

    def original(name, data):
        bk = backup.get(name)
        return bk.weight if bk is not None else data

    new_root = clone_tree(root, weight_source=original,
                          drop=lambda attr: is_loader_state(attr) or attr == "quantkit_reports")
    reset_loader_state_defaults(new_root)
    baked = set()
    total = sum(sum(is_layer(m) for m in _subtree(new_root, path).modules())
                for path, _, _ in targets)
    bar = comfy.utils.ProgressBar(max(total, 1))
    done = [0]
    reports = []
    for path, recipe_name, label in targets:
        prefix = f"{path}." if path else ""

        def weight_of(name, module, prefix=prefix):
            key = f"{prefix}{name}.weight"
            w = true_weight(key, module, module.weight)  # e.g. a scaled fp8 layer's weight x scale
            if key in source.patches:
                w = comfy.lora.calculate_weight(source.patches[key], w.to(device, torch.float32,
                                                copy=True), key)
                baked.add(key)
            return w

        def progress(i, n, base=done[0]):
            bar.update_absolute(base + i, total)
            # Between layers: Cancel stops the node within one layer, also where no
            # progress hook checks (in-process use, or 0.33 throttling the hook's calls).
            comfy.model_management.throw_exception_if_processing_interrupted()

        report = quantize_tree(_subtree(new_root, path), format_id, get_recipe(recipe_name),
                               target=label, exclude=exclude or None,
                               run_device=source.load_device, work_device=device,
                               weight_of=weight_of, layer_cls=LAYER_CLASSES, progress=progress,
                               plan=(plans or {}).get(path), is_layer=is_layer)
        done[0] += len(report.layers)
        reports.append(report)
    settle_stored_dtypes(new_root)
    new_root.to(source.offload_device)
    new_root.device = source.offload_device
    # shared with the source's, not copied: a report is never changed once attached
    new_root.quantkit_reports = tuple(getattr(root, "quantkit_reports", ())) + tuple(reports)
    release_from_gpu(source)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    patcher = new_quantized_patcher(source, new_root, baked)
    source_init = getattr(source, "cached_patcher_init", None)
    if source_init is not None:  # a source from a core loader: the copy can be made again
        set_reload_recipe(patcher, requantized_patcher, (source_init, dict(source.patches), targets,
                                                         format_id, exclude, quantize_on, plans))
    return patcher, reports


def requantized_patcher(source_init, patches, targets, format_id, exclude, quantize_on, plans=None,
                        disable_dynamic=False):
    """The same quantized model again, with weights of its own: the source's loader runs
    again (ComfyUI's reload recipe), its patches as they were, then the same quantization."""
    loader, args = source_init[0], source_init[1]
    source = loader(*args, **({"disable_dynamic": True} if disable_dynamic else {}))
    if len(source_init) > 2:
        source = source[source_init[2]]
    source.patches = {k: list(v) for k, v in patches.items()}
    return quantize_patcher(source, targets, format_id, exclude, quantize_on, plans)[0]


def release_from_gpu(source) -> None:
    """The quantized copy replaces its source on the GPU. ComfyUI creates a text encoder
    directly on a roomy GPU and keeps models loaded while memory lasts, so the 16-bit source
    would stay beside its copy; it is unloaded through ComfyUI's own free_memory, as ComfyUI
    does to make room (it is loaded again if another branch uses it; its weights are kept)."""
    if torch.device(source.load_device).type == "cpu":
        return
    loaded = list(comfy.model_management.current_loaded_models)
    keep = [m for m in loaded if m.model is None or m.model.model is not source.model]
    if len(keep) < len(loaded):
        comfy.model_management.free_memory(1e30, source.load_device, keep_loaded=keep)


def _subtree(root, path):
    return root.get_submodule(path) if path else root
