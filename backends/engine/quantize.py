"""Quantize the Linear/Conv layers of a module tree in place (call it on a clone)."""
from __future__ import annotations

import logging
import re
import time
from typing import Callable, List, Optional

import torch
import torch.nn as nn

from .base import parts_nbytes, require_format
from ..kernels.decode_groups import link_decode_groups
from .errors import QuantKitError
from .modules import make_quantized
from .recipes import Recipe
from .registry import check_usable, get_format
from .report import FALLBACK, KEPT, QUANTIZED, QuantReport
from .storage_census import own_stored_bytes

log = logging.getLogger("quantkit")

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
Progress = Callable[[int, int], None]


def _matches(patterns, name: str) -> bool:
    return any(re.search(p, name) for p in patterns)


def _set_child(root: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, child)


_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory")  # CUDA, CPU allocator


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return any(words in text for words in _OOM_WORDS)


def out_of_memory_advice(work_device) -> str:
    """What to do when quantizing on `work_device` ran out of memory: a route that needs less."""
    if torch.device(work_device).type != "cpu":
        return ("Set 'quantize_on' to 'cpu' (the math then uses RAM, not GPU memory), or free "
                "GPU memory first.")
    return ("The quantized copy is built in RAM beside the input model: free RAM (unload other "
            "models, close other programs), choose a smaller format (e.g. gguf:Q4_K, about 4.5 "
            "bits), or convert the model once outside ComfyUI (python -m backends.gguf.convert, "
            "see the README) and load the .gguf with Load GGUF Model, which never holds the "
            "16-bit model.")


def recipe_keep_reason(name, module, recipe: Recipe, exclude: Optional[str]) -> Optional[str]:
    """Why a layer stays as it is whatever the format (recipe, exclude pattern, size), or None."""
    if _matches(recipe.keep, name):
        return "recipe keeps it in high precision"
    if exclude and re.search(exclude, name):
        return "matched the exclude pattern"
    if module.weight.nelement() < recipe.min_params:
        return f"tiny layer (< {recipe.min_params} weights)"
    return None


def params_outside(root: nn.Module, layers) -> List[torch.Tensor]:
    """`root`'s parameters outside `layers`, a tied one (transformers' T5: shared and
    encoder.embed_tokens) once."""
    in_layers = {id(m) for m in layers}
    return list({id(p): p for m in root.modules() if id(m) not in in_layers
                 for p in m.parameters(recurse=False)}.values())


def check_exclude(exclude: Optional[str]) -> None:
    """A clear error for an exclude pattern that is not a regular expression."""
    if exclude:
        try:
            re.compile(exclude)
        except re.error as exc:
            raise QuantKitError(f"The exclude pattern '{exclude}' is not a valid regular "
                                f"expression ({exc}). Example: 'attn2|proj_out'.") from None


def plan_layer(name, module, adapter, spec, recipe: Recipe, exclude: Optional[str]):
    """(action, spec or None, reason) for one layer, without doing any work."""
    weight = module.weight
    if _matches(recipe.keep, name):
        return KEPT, None, "recipe keeps it in high precision"
    if spec.keep_final_projection and _matches(recipe.final_projection, name):
        return KEPT, None, "final projection kept at <= 4 bits"
    reason = recipe_keep_reason(name, module, recipe, exclude)
    if reason is not None:
        return KEPT, None, reason
    problem = adapter.supports_shape(spec, weight.shape)
    if problem is None:
        return QUANTIZED, spec, ""
    if spec.fallback:
        fb = require_format(adapter, spec.fallback)
        if adapter.supports_shape(fb, weight.shape) is None:
            return FALLBACK, fb, problem
    return KEPT, None, problem


def _usable_format(format_id: str, run_device):
    adapter, spec = get_format(format_id)
    if spec.read_only:
        raise QuantKitError(f"'{format_id}' can be read from .gguf files, but QuantKit cannot "
                            f"produce it. Choose a format from the list, e.g. gguf:Q4_K.")
    check_usable(adapter, spec.name, run_device)
    return adapter, spec


def _planned_layer(name, plan: LayerPlan):
    """(action, spec or None, reason) for one layer of a per-layer plan."""
    if name not in plan.formats:
        return KEPT, None, plan.reasons.get(name, "not in the per-layer plan")
    format_id = plan.formats[name]
    reason = plan.reasons.get(name, "")
    if format_id is None:
        return KEPT, None, reason or "the per-layer plan keeps it"
    return QUANTIZED, get_format(format_id)[1], reason


class LayerPlan:
    """A format per layer name (None: kept as stored), with a reason per layer and lines
    for the report (why this plan). Layers the plan does not name are kept."""

    def __init__(self, formats, reasons=None, notes=()):
        self.formats = dict(formats)
        self.reasons = dict(reasons or {})
        self.notes = tuple(notes)


def quantize_tree(root: nn.Module, format_id: str, recipe: Recipe, *, target: str,
                  exclude: Optional[str] = None, run_device="cpu", work_device="cpu",
                  weight_of: Optional[Callable[[str, nn.Module], torch.Tensor]] = None,
                  layer_cls=None, progress: Optional[Progress] = None,
                  plan: Optional[LayerPlan] = None,
                  is_layer: Optional[Callable[[nn.Module], bool]] = None) -> QuantReport:
    """Replaces quantizable layers of `root` (in place) and returns what was done.

    run_device: where the model will compute (checked against the format's needs).
    work_device: where the quantization math runs, one layer at a time; results are
    stored on the device the original weight was on.
    weight_of(name, module): the float weight to quantize (lets a host bake patches).
    plan: a format per layer (budget.py); `format_id` then only names the result in the
    report, and the recipe and `exclude` have already been applied by whoever made the plan.
    is_layer(module): which modules are layers (default: QUANTIZABLE); a host whose own
    Linear is no nn.Linear names it here, and its weight_of returns the float weight.
    """
    if plan is None:
        adapter, spec = _usable_format(format_id, run_device)
    else:
        for used in sorted({f for f in plan.formats.values() if f is not None}):
            _usable_format(used, run_device)
    check_exclude(exclude)
    report = QuantReport(target=target, format_id=format_id, recipe=recipe.name,
                         device=str(work_device), notes=() if plan is None else plan.notes)
    is_layer = is_layer or (lambda m: isinstance(m, QUANTIZABLE))
    layers = [(n, m) for n, m in root.named_modules() if is_layer(m)]
    report.record_other(params_outside(root, [m for _, m in layers]))
    start = time.perf_counter()
    for i, (name, module) in enumerate(layers):
        if plan is None:
            action, use_spec, reason = plan_layer(name, module, adapter, spec, recipe, exclude)
        else:
            action, use_spec, reason = _planned_layer(name, plan)
        values = module.weight.nelement() + (0 if module.bias is None else module.bias.nelement())
        before = own_stored_bytes(module)  # as stored: a scaled fp8 layer's scale too
        if use_spec is None:
            report.record(name, module.weight.shape, KEPT, None, reason, values=values,
                          stored_bytes=before, source_bytes=before)
        else:
            layer_adapter = adapter if plan is None else get_format(use_spec.id)[0]
            new = _quantize_layer(name, module, layer_adapter, use_spec, work_device, weight_of, layer_cls)
            _set_child(root, name, new)
            report.record(name, module.weight.shape, action, use_spec.id, reason, values=values,
                          stored_bytes=new.stored_bytes(), source_bytes=before)
        if progress is not None:
            progress(i + 1, len(layers))
    link_decode_groups(root)
    report.seconds = time.perf_counter() - start
    log.info(report.summary())
    return report


def _quantize_layer(name, module, adapter, spec, work_device, weight_of, layer_cls):
    shape = tuple(module.weight.shape)
    store_device = module.weight.device
    try:
        weight = weight_of(name, module) if weight_of is not None else module.weight.detach()
        parts = adapter.quantize(weight.to(work_device, torch.float32), spec)
        parts = {k: v.to(store_device) for k, v in parts.items()}
    except QuantKitError:
        raise
    except Exception as exc:
        if _is_oom(exc):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise QuantKitError(
                f"Ran out of memory on {work_device} while quantizing layer '{name}' {shape} to "
                f"{spec.id}. The input model is unchanged. {out_of_memory_advice(work_device)}") from exc
        raise QuantKitError(f"Quantizing layer '{name}' {shape} to {spec.id} "
                            f"failed: {type(exc).__name__}: {exc}") from exc
    bias = module.bias.detach() if module.bias is not None else None
    new = make_quantized(module, adapter, spec, parts, bias, layer_cls)
    log.debug("%s -> %s (%d bytes)", name, spec.id, parts_nbytes(parts))
    return new
