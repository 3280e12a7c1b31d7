"""Where a module tree's memory is: bytes by storage format and by device, and what the
same tree would take at 16 bits. Reads tensor metadata only: nothing is moved or copied."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from .modules import QuantizedLayer

_DTYPE_NAMES = {
    torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "fp8_e4m3fn", torch.float8_e5m2: "fp8_e5m2",
}
OFFLOAD_DEVICES = ("cpu",)
NO_STORAGE_DEVICES = ("meta",)


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _nbytes(t: torch.Tensor) -> int:
    return t.nelement() * t.element_size()


@dataclass(frozen=True)
class TensorEntry:
    format: str
    stored_bytes: int
    logical_elements: int  # elements of the value it stands for; 0 for auxiliary parts (scales)
    device: str
    storage_key: Optional[tuple]  # the same key means the same memory; None: holds none
    is_parameter: bool


@dataclass
class TreeCensus:
    parameters: int = 0  # logical parameter count (a quantized weight counts its full shape)
    stored_bytes: int = 0
    bytes_at_16bit: int = 0  # every logical element (parameters and buffers) at 2 bytes
    bytes_by_format: Dict[str, int] = field(default_factory=dict)
    bytes_by_device: Dict[str, int] = field(default_factory=dict)
    bytes_by_storage: Dict[tuple, int] = field(default_factory=dict)  # to spot sharing between trees

    @property
    def gpu_bytes(self) -> int:
        return sum(b for d, b in self.bytes_by_device.items()
                   if d.split(":")[0] not in OFFLOAD_DEVICES + NO_STORAGE_DEVICES)

    @property
    def offloaded_bytes(self) -> int:
        return sum(b for d, b in self.bytes_by_device.items() if d.split(":")[0] in OFFLOAD_DEVICES)

    @property
    def saving_vs_16bit(self) -> int:
        return self.bytes_at_16bit - self.stored_bytes

    def add(self, entry: TensorEntry) -> None:
        if entry.storage_key is not None:
            if entry.storage_key in self.bytes_by_storage:
                return  # tied weights: one memory, one parameter
            self.bytes_by_storage[entry.storage_key] = entry.stored_bytes
        if entry.is_parameter:
            self.parameters += entry.logical_elements
        self.stored_bytes += entry.stored_bytes
        self.bytes_at_16bit += entry.logical_elements * 2
        for figures, key in ((self.bytes_by_format, entry.format), (self.bytes_by_device, entry.device)):
            figures[key] = figures.get(key, 0) + entry.stored_bytes


def _layout_tensors(t) -> list:
    """The scales and other tensors beside a core QuantizedTensor's data: a dict
    `_layout_params` (ComfyUI 0.8-0.1x) or a dataclass `_params` (comfy-kitchen, 0.33)."""
    params = getattr(t, "_layout_params", None)
    if params is None:
        params = getattr(t, "_params", None)
        params = vars(params) if params is not None and hasattr(params, "__dict__") else {}
    return [v for v in params.values() if isinstance(v, torch.Tensor)]


def _foreign_format(t: torch.Tensor) -> Optional[Tuple[str, int, int, torch.Tensor]]:
    """(format, stored bytes, logical elements, data tensor) for quantized tensor types that
    other code puts into models, recognised by their attributes; None for plain tensors."""
    qdata = getattr(t, "_qdata", None)  # ComfyUI's QuantizedTensor (comfy.quant_ops)
    if isinstance(qdata, torch.Tensor):
        extra = sum(_nbytes(v) for v in _layout_tensors(t))
        layout = getattr(t, "_layout_cls", None) or getattr(t, "_layout_type", "quantized")
        fmt = f"{dtype_name(qdata.dtype)} ({getattr(layout, '__name__', layout)})"
        return fmt, _nbytes(qdata) + extra, t.shape.numel(), qdata
    ggml_type = getattr(t, "tensor_type", None)  # ComfyUI-GGUF's GGMLTensor: raw GGUF blocks
    if ggml_type is not None and hasattr(t, "tensor_shape"):
        return (getattr(ggml_type, "name", str(ggml_type)), _nbytes(t),
                torch.Size(t.tensor_shape).numel(), t)
    state = getattr(t, "quant_state", None)  # bitsandbytes Params4bit: nf4 / fp4
    if state is not None and getattr(t, "quant_type", None) and hasattr(state, "shape"):
        return str(t.quant_type), _nbytes(t), torch.Size(state.shape).numel(), t
    return None


def tensor_entry(t: torch.Tensor, is_parameter: bool, quantized_in: Optional[QuantizedLayer] = None,
                 name: str = "") -> TensorEntry:
    """One tensor's figures. `quantized_in`/`name`: the QuantizedLayer that owns it and its
    attribute name there (its `weight` and `weight_*` parts are stored in the layer's format)."""
    foreign = _foreign_format(t)
    if foreign is not None:
        fmt, stored, logical, data = foreign
    elif quantized_in is not None and (name == "weight" or name.startswith("weight_")):
        fmt, stored, data = quantized_in.spec.id, _nbytes(t), t
        logical = quantized_in.weight_shape.numel() if name == "weight" else 0
    else:
        fmt, stored, logical, data = dtype_name(t.dtype), _nbytes(t), t.nelement(), t
    device = str(data.device)
    if data.device.type in NO_STORAGE_DEVICES:
        return TensorEntry(fmt, 0, logical, device, None, is_parameter)
    return TensorEntry(fmt, stored, logical, device, (device, data.data_ptr(), stored), is_parameter)


def _own_tensors(module: nn.Module) -> Iterator[Tuple[str, torch.Tensor, bool]]:
    for name, p in module._parameters.items():
        if p is not None:
            yield name, p, True
    for name, b in module._buffers.items():
        if b is not None:
            yield name, b, False


def own_stored_bytes(module: nn.Module) -> int:
    """Bytes of a module's own parameters and buffers as stored (a core QuantizedTensor: its
    data and scales; a scaled fp8 layer: its float8 weight and its scale)."""
    return sum(stored_nbytes(t) for _, t, _ in _own_tensors(module))


def stored_nbytes(t: torch.Tensor) -> int:
    """What a tensor takes as stored, wherever it is (also on the meta device)."""
    foreign = _foreign_format(t)
    return _nbytes(t) if foreign is None else foreign[1]


def census_tree(root: nn.Module) -> TreeCensus:
    """Every parameter and buffer of `root`, each memory counted once."""
    census = TreeCensus()
    for module in root.modules():
        owner = module if isinstance(module, QuantizedLayer) else None
        for name, t, is_parameter in _own_tensors(module):
            census.add(tensor_entry(t, is_parameter, owner, name))
    return census


def shared_bytes(*censuses: TreeCensus) -> int:
    """Bytes counted in more than one of the trees (e.g. a quantized clone and its source
    share their unquantized weights): subtract once per extra count for a true total."""
    seen: Dict[tuple, int] = {}
    extra = 0
    for census in censuses:
        for key, nbytes in census.bytes_by_storage.items():
            if key in seen:
                extra += nbytes
            else:
                seen[key] = nbytes
    return extra
