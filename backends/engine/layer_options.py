"""One layer's choices: for each candidate format, the bytes the layer would take (the
adapter's real parts, as QuantReport counts them) and the squared error it would add to the
model's output, estimated from the layer's output sensitivity (output_sensitivity.py): its
weight error weighed by the pooled Fisher diagonal, plus, for formats that also quantize
activations, the extra error of the adapter's own matmul on the calibration rows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .base import BackendAdapter, parts_nbytes, require_format
from .output_sensitivity import Sensitivity
from .registry import get_format

KEEP = None  # the format id of "stored as it is" (the source's own dtype)


@dataclass(frozen=True)
class Option:
    format_id: Optional[str]  # KEEP (None): the layer stays as it is stored
    nbytes: int  # weight and bias as stored
    error: float  # estimated squared error added to the model's output


def _nbytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.nelement() * t.element_size()


def resolve_candidate(format_id: str, shape) -> Optional[str]:
    """The format a layer of `shape` is stored in when `format_id` is asked for: the format,
    its fallback (K-quants on widths that are not whole blocks), or None when neither fits."""
    adapter, spec = get_format(format_id)
    if adapter.supports_shape(spec, shape) is None:
        return spec.id
    if spec.fallback:
        fb = require_format(adapter, spec.fallback)
        if adapter.supports_shape(fb, shape) is None:
            return fb.id
    return None


def candidate_formats(candidates: Sequence[str], shape, exclude_final: bool = False) -> list:
    """The distinct formats a layer of `shape` can take, in the candidates' order.
    exclude_final: the layer is a final projection, which formats of <= 4 bits leave kept."""
    out = []
    for format_id in candidates:
        _, spec = get_format(format_id)
        if exclude_final and spec.keep_final_projection:
            continue
        resolved = resolve_candidate(format_id, shape)
        if resolved is not None and resolved not in out:
            out.append(resolved)
    return out


def activation_mse(module: nn.Module, rows: torch.Tensor, adapter: BackendAdapter, spec, parts,
                   dequantized: torch.Tensor) -> float:
    """Mean squared difference, on the calibration rows, between the adapter's own matmul and
    a float matmul with the dequantized weight: what quantizing activations adds. 0 for
    convolutions and for adapters that compute through the dequantized weight."""
    if not isinstance(module, nn.Linear) or type(adapter).linear is BackendAdapter.linear:
        return 0.0
    approx = adapter.linear(rows, parts, spec, dequantized.shape, None).float()
    exact = rows @ dequantized.T
    return float((approx - exact).double().square().mean())


def layer_options(module: nn.Module, weight: torch.Tensor, rows: Optional[torch.Tensor],
                  sensitivity: Sensitivity, formats: Sequence[str], work_device="cpu",
                  on_parts=None) -> list:
    """Options for one layer: KEEP plus each of `formats` (already resolved for its shape).
    `weight`: the float weight to quantize; `rows`: calibration rows (calibration.py) or None.
    on_parts(format_id, parts): sees each quantized weight before it is dropped."""
    work_device = torch.device(work_device)
    weight = weight.detach().to(work_device, torch.float32)
    bias_bytes = _nbytes(module.bias)
    options = [Option(KEEP, _nbytes(module.weight) + bias_bytes, 0.0)]
    if rows is not None:
        rows = rows.to(work_device, torch.float32)
    for format_id in formats:
        adapter, spec = get_format(format_id)
        parts = adapter.quantize(weight, spec)
        dequantized = adapter.dequantize(parts, spec, weight.shape, torch.float32)
        error = sensitivity.weight_error(dequantized - weight)
        if rows is not None and sensitivity.gain > 0:
            error += sensitivity.gain * activation_mse(module, rows, adapter, spec, parts,
                                                       dequantized.reshape(weight.shape[0], -1))
        options.append(Option(format_id, parts_nbytes(parts) + bias_bytes, error))
        if on_parts is not None:
            on_parts(format_id, parts)
        del parts, dequantized
    return options
