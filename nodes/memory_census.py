"""Collects what the Memory Report shows: the wired models and those ComfyUI has loaded
(figures read from their tensors, never loading or moving them), the wired latent and
image, and the device and RAM figures. No drawing or text here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn

import comfy.model_management

from ..backends.engine.storage_census import TreeCensus, census_tree, dtype_name, shared_bytes
from .memory_devices import DeviceFigures, device_figures

WIRED_MODELS = ("model", "clip", "vae")


@dataclass
class Component:
    name: str  # "model" (wired) or the class of a model ComfyUI loaded
    model_class: str
    census: TreeCensus
    loaded_on: Optional[str]  # the device ComfyUI loaded it for; None when not loaded
    quantkit_reports: tuple  # the QuantReport of each QuantKit node that made it
    wired: bool
    loaded_bytes: int = 0  # what ComfyUI says it has loaded onto the device (patcher.loaded_size())
    dynamic: bool = False  # loaded by Dynamic VRAM: weights stay in RAM, the GPU holds staged copies


@dataclass
class TensorInput:
    name: str  # "latent", "image"
    shape: tuple
    format: str
    device: str
    nbytes: int


@dataclass
class MemorySnapshot:
    label: str
    devices: DeviceFigures
    components: List[Component] = field(default_factory=list)
    inputs: List[TensorInput] = field(default_factory=list)
    shared_bytes: int = 0  # counted in more than one component (clones share weights)

    @property
    def total_model_bytes(self) -> int:
        return sum(c.census.stored_bytes for c in self.components) - self.shared_bytes


def patcher_of(obj):
    """The ModelPatcher behind a MODEL (itself), CLIP or VAE (their `.patcher`)."""
    return getattr(obj, "patcher", obj)


def module_of(obj) -> Optional[nn.Module]:
    module = getattr(patcher_of(obj), "model", None)
    return module if isinstance(module, nn.Module) else None


def loaded_patchers() -> list:
    """(patcher, device) for each model in comfy.model_management.current_loaded_models."""
    found = []
    for loaded in list(comfy.model_management.current_loaded_models):
        patcher = loaded.model  # a weak reference: None once the patcher is gone
        if patcher is not None and module_of(patcher) is not None:
            found.append((patcher, str(loaded.device)))
    return found


def _component(name, module, loaded, wired) -> Component:
    """`loaded`: (patcher, device) when ComfyUI has the model loaded, else None."""
    patcher, device = loaded if loaded else (None, None)
    dynamic = bool(patcher is not None and getattr(patcher, "is_dynamic", lambda: False)())
    return Component(name=name, model_class=type(module).__name__, census=census_tree(module),
                     loaded_on=device, quantkit_reports=tuple(getattr(module, "quantkit_reports", ())),
                     wired=wired, loaded_bytes=int(patcher.loaded_size()) if patcher is not None else 0,
                     dynamic=dynamic)


def collect_components(wired: dict) -> List[Component]:
    loaded = {id(module_of(p)): (p, dev) for p, dev in loaded_patchers()}
    components, seen = [], set()
    for name in WIRED_MODELS:
        module = module_of(wired[name]) if wired.get(name) is not None else None
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        components.append(_component(name, module, loaded.get(id(module)), wired=True))
    for module_id, (patcher, dev) in loaded.items():
        if module_id not in seen:
            seen.add(module_id)
            module = module_of(patcher)
            components.append(_component(type(module).__name__, module, (patcher, dev), wired=False))
    return components


def _tensor_input(name, t) -> Optional[TensorInput]:
    if not isinstance(t, torch.Tensor):
        return None
    return TensorInput(name, tuple(t.shape), dtype_name(t.dtype), str(t.device),
                       t.nelement() * t.element_size())


def collect_inputs(latent, image) -> List[TensorInput]:
    found = [_tensor_input("latent", latent.get("samples")) if isinstance(latent, dict) else None,
             _tensor_input("image", image)]
    return [f for f in found if f is not None]


def take_snapshot(label: str, model=None, clip=None, vae=None, latent=None, image=None) -> MemorySnapshot:
    components = collect_components({"model": model, "clip": clip, "vae": vae})
    return MemorySnapshot(label=label, devices=device_figures(), components=components,
                          inputs=collect_inputs(latent, image),
                          shared_bytes=shared_bytes(*(c.census for c in components)))
