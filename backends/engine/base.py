"""The adapter interface every backend implements, and the description of a format.

A backend turns one float weight (a Linear's [out, in] or a Conv's [out, in, kh, kw])
into a small dict of *plain* tensors (its "parts") and back. Plain tensors keep byte
counts honest (nelement * element_size is what is really stored) and let any host
(ComfyUI, a benchmark) move them between devices with ordinary `Module.to`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from .errors import UnknownFormat

Parts = dict  # name -> torch.Tensor; the key "weight" holds the main packed payload


@dataclass(frozen=True)
class FormatSpec:
    """What a format is and what it needs. `id` ("torchao:int8wo") is stored in
    workflow files: never rename one."""

    backend: str
    name: str
    bits_per_weight: float  # payload plus scales, as stored
    description: str
    needs_cuda: bool = False
    min_compute_capability: Optional[tuple] = None  # (major, minor)
    cpu_kernels: bool = True  # False: runs on CPU only through slow fallbacks, or not at all
    block_size: int = 1  # the flattened input width must be a multiple of this
    fallback: Optional[str] = None  # format used for layers whose width is not block-aligned
    conv_ok: bool = True  # can hold convolution weights
    keep_final_projection: bool = False  # 4-bit: leave the output projection in high precision
    read_only: bool = False  # read from files only: QuantKit has no quantizer for it
    needs_package: bool = True  # False: written in torch alone, the backend's package is not needed

    def __post_init__(self):
        if self.bits_per_weight <= 0 or self.bits_per_weight > 16:
            raise ValueError(f"bits_per_weight must be in (0, 16], got {self.bits_per_weight}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    @property
    def id(self) -> str:
        return f"{self.backend}:{self.name}"


def hardware_problem(spec: FormatSpec, device: torch.device) -> Optional[str]:
    """Why `spec` cannot run on `device`, or None when it can."""
    device = torch.device(device)
    if device.type == "cpu":
        if spec.needs_cuda or not spec.cpu_kernels:
            return f"'{spec.id}' needs an NVIDIA GPU (CUDA); this run is on the CPU."
        return None
    if device.type == "cuda" and spec.min_compute_capability is not None:
        have = torch.cuda.get_device_capability(device)
        need = spec.min_compute_capability
        if tuple(have) < tuple(need):
            return (f"'{spec.id}' needs compute capability {need[0]}.{need[1]} or higher; "
                    f"this GPU has {have[0]}.{have[1]}.")
    return None


class BackendAdapter(ABC):
    """One per backend module. Stateless: safe to share between models."""

    name: str = ""
    package: str = ""  # the import name checked for availability
    pip_requirement: str = ""  # what the user installs
    formats: Mapping[str, FormatSpec] = {}

    # -- availability -------------------------------------------------------------
    def missing_package(self, spec: Optional[FormatSpec] = None) -> Optional[str]:
        """A message naming what to install, or None when the package imports (or when
        `spec` is given and does not need it)."""
        from .registry import import_problem  # local: avoids an import cycle

        if spec is not None and not spec.needs_package:
            return None
        return import_problem(self.package, self.pip_requirement, self.name)

    # -- the work -----------------------------------------------------------------
    @abstractmethod
    def quantize(self, weight: torch.Tensor, spec: FormatSpec) -> Parts:
        """Float weight (any shape, 2-D after flattening dims 1..) -> plain tensors."""

    @abstractmethod
    def dequantize(self, parts: Parts, spec: FormatSpec, shape: torch.Size,
                   dtype: torch.dtype) -> torch.Tensor:
        """Parts -> float weight of `shape` and `dtype`, on the parts' device."""

    def linear(self, x: torch.Tensor, parts: Parts, spec: FormatSpec, shape: torch.Size,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
        """y = x W^T + b. Backends with fused kernels override this."""
        return F.linear(x, self.dequantize(parts, spec, shape, x.dtype), bias)

    def decode_plan(self, spec: FormatSpec, shape: torch.Size):
        """How decode_groups' one-launch kernel decodes this format's weight (a DecodePlan),
        or None: the format computes its own way."""
        return None

    def supports_shape(self, spec: FormatSpec, shape: torch.Size) -> Optional[str]:
        """Why a weight of this shape cannot be stored in `spec`, or None."""
        width = 1
        for d in shape[1:]:
            width *= int(d)
        if len(shape) < 2:
            return "not a matrix"
        if len(shape) > 2 and not spec.conv_ok:
            return f"'{spec.id}' holds matrices only (this is a {len(shape)}-D convolution weight)"
        if width % spec.block_size:
            return f"input width {width} is not a multiple of the block size {spec.block_size}"
        return None


def parts_nbytes(parts: Parts) -> int:
    return sum(t.nelement() * t.element_size() for t in parts.values())


def require_format(adapter: BackendAdapter, name: str) -> FormatSpec:
    """The one lookup of a format by name: every caller (registry, adapters, quantize)
    goes through here, so an unknown name is always an UnknownFormat listing the ids."""
    spec = adapter.formats.get(name)
    if spec is None:
        known = ", ".join(s.id for s in adapter.formats.values())
        raise UnknownFormat(f"Backend '{adapter.name}' has no format '{name}'. It offers: {known}.")
    return spec
