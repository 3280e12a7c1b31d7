"""Which layers a budget fit searches and what each of them can become: the candidate
formats per device, the bytes that stay fixed, the smallest size reachable, and every
searched layer measured in every candidate (layer_options.py)."""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .budget import LayerChoices
from .errors import QuantKitError
from .layer_options import candidate_formats, layer_options
from .output_sensitivity import Sensitivity
from .quantize import QUANTIZABLE, params_outside, recipe_keep_reason
from .recipes import Recipe
from .registry import check_usable, get_format
from .storage_census import own_stored_bytes, stored_nbytes

# Candidate ladders, fastest first on each device (the tie order). Every format here is
# written in torch alone (no optional package). On NVIDIA GPUs torchao:int8wo and the gguf
# types run near bf16's step time (fused 8-bit kernels; gguf decode groups); on a CPU
# torchao:int8dq is the one format faster than fp32 (README, bench/RESULTS.md).
GGUF_LADDER = ("gguf:Q8_0", "gguf:Q6_K", "gguf:Q5_K", "gguf:Q4_K", "gguf:Q3_K", "gguf:Q2_K")
LADDERS = {"cuda": ("torchao:int8wo",) + GGUF_LADDER, "cpu": ("torchao:int8dq",) + GGUF_LADDER}


def default_candidates(device) -> Tuple[str, ...]:
    return LADDERS["cuda" if torch.device(device).type == "cuda" else "cpu"]


def check_candidates(candidates: Sequence[str], run_device) -> None:
    """Every candidate exists, can be produced and runs on `run_device` (clear errors)."""
    if not candidates:
        raise QuantKitError("No candidate formats given. Example: gguf:Q8_0, gguf:Q4_K, gguf:Q3_K.")
    for format_id in candidates:
        adapter, spec = get_format(format_id)
        if spec.read_only:
            raise QuantKitError(f"'{format_id}' can be read from .gguf files, but QuantKit cannot "
                                f"produce it. Remove it from the candidates.")
        check_usable(adapter, spec.name, run_device)


def fixed_parts(root: nn.Module, recipe: Recipe, exclude: Optional[str]):
    """(searched layers {name: module}, kept layers {name: reason}, fixed bytes): what the
    search may change, and the bytes it cannot (kept layers, parameters outside layers)
    counted as QuantReport counts them."""
    layers = [(n, m) for n, m in root.named_modules() if isinstance(m, QUANTIZABLE)]
    fixed = sum(stored_nbytes(p) for p in params_outside(root, [m for _, m in layers]))
    searched, kept = {}, {}
    for name, module in layers:
        reason = recipe_keep_reason(name, module, recipe, exclude)
        if reason is None:
            searched[name] = module
        else:
            kept[name] = reason
            fixed += own_stored_bytes(module)
    return searched, kept, fixed


Progress = Callable[[int, int], None]


def _is_final(name: str, recipe: Recipe) -> bool:
    return any(re.search(p, name) for p in recipe.final_projection)


def nominal_smallest(searched: Dict[str, nn.Module], fixed_bytes: int, candidates: Sequence[str],
                     recipe: Recipe) -> int:
    """The smallest size before anything is quantized: each layer in its smallest candidate
    (fallbacks and the final-projection rule applied) at the format's nominal bits. Exact for
    block formats (gguf); a little under for formats with a scale per row."""
    total = fixed_bytes
    for name, module in searched.items():
        weights = module.weight.nelement()
        sizes = [weights * module.weight.element_size()]
        sizes += [weights * get_format(f)[1].bits_per_weight / 8 for f in
                  candidate_formats(candidates, module.weight.shape, _is_final(name, recipe))]
        bias = 0 if module.bias is None else module.bias.nelement() * module.bias.element_size()
        total += int(min(sizes)) + bias
    return total


def measure_layers(searched: Dict[str, nn.Module], rows: Dict[str, Optional[torch.Tensor]],
                   sensitivity: Dict[str, Sensitivity], candidates: Sequence[str], recipe: Recipe, *,
                   weight_of=None, work_device="cpu", progress: Optional[Progress] = None,
                   on_parts=None) -> List[LayerChoices]:
    """Every searched layer quantized in every candidate format, its error estimated from its
    sensitivity (and its rows, for formats that quantize activations).
    on_parts(name, format_id, parts): sees each quantized weight (a benchmark keeps them)."""
    out = []
    for i, (name, module) in enumerate(searched.items()):
        formats = candidate_formats(candidates, module.weight.shape, _is_final(name, recipe))
        weight = weight_of(name, module) if weight_of is not None else module.weight
        layer_rows, layer_sensitivity = rows.get(name), sensitivity.get(name, Sensitivity())
        try:
            keep = None if on_parts is None else (lambda f, parts, name=name: on_parts(name, f, parts))
            options = layer_options(module, weight, layer_rows, layer_sensitivity, formats,
                                    work_device, on_parts=keep)
        except QuantKitError:
            raise
        except Exception as exc:
            raise QuantKitError(f"Measuring layer '{name}' {tuple(module.weight.shape)} in "
                                f"{', '.join(formats)} failed: {type(exc).__name__}: {exc}") from exc
        note = "" if layer_sensitivity.fisher is not None else "never ran during calibration: smallest option"
        out.append(LayerChoices(name, tuple(options), note))
        if progress is not None:
            progress(i + 1, len(searched))
    return out
