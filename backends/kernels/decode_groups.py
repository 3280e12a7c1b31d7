"""Decode groups: weight-only layers called one after another decode their weights together.

A weight-only layer (int8 rows, GGUF blocks) decodes its weight for each call and then
runs an ordinary matrix product. On a GPU whose host queues kernels slowly, that extra
decode launch per layer, not the GPU, sets the step time of a UNet (hundreds of small
layers). `link_decode_groups` watches a model's first pass on the GPU; from the second,
layers that were called one after another form groups of at most MAX_GROUP_WEIGHTS
weights. The first member called decodes the whole group, in one Triton launch, into a
buffer per (device, dtype) that all groups share, and the other members take their slice
as it is: a matrix product with a float weight, as bf16 runs. The buffer knows its owner:
while a group owns it, its members decode nothing. Groups follow the call order, not the
module order: ComfyUI's transformer blocks register attn1, ff, attn2 but call attn1, attn2, ff.

Correctness does not depend on the call order: a member whose group does not own the
buffer decodes the group again. A group that keeps being displaced before a second member
used it (groups called in turns) stops grouping. Layers off the input's device (partial
loading), with weight hooks (LoRA), under torch.compile, on the CPU or without Triton use
their own path.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from . import fast_linear

# At bf16 a full group takes 64 MiB of buffer: an SDXL transformer block at 1280 channels fits.
MAX_GROUP_WEIGHTS = 32 << 20
STRIKES_TO_STOP = 3  # displaced this often after serving one member: the group stops
INT8_ROWS = "int8 rows"  # a DecodePlan kind besides the GGML type names
ENABLED = True  # False: every layer decodes on its own (the benchmark's per-layer rows)


@dataclass(frozen=True)
class DecodePlan:
    """How the group kernel reads one layer: `kind` is INT8_ROWS or a GGML type name;
    `source` and `scale` name the layer's parameters."""
    kind: str
    n_weights: int
    source: str = "weight"
    scale: Optional[str] = None
    row_len: int = 0


class _Buffer:
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.owner: Optional[DecodeGroup] = None
        self.views: List[torch.Tensor] = []  # the owner's members' weights, in member order


_BUFFERS: Dict[tuple, _Buffer] = {}
_largest_group = [0]  # weights of the largest group linked so far: the buffer's size


def _kernels():
    from . import triton_grouped  # imports triton: only ever reached on a CUDA device
    return triton_grouped


class DecodeGroup:
    def __init__(self, members: List[nn.Module], plans: List[DecodePlan]):
        self._members = [weakref.ref(m) for m in members]
        self._plans = plans
        self._offsets, total = [], 0
        for plan in plans:
            self._offsets.append(total)
            total += plan.n_weights
        self.total = total
        self.stopped = False
        self._strikes = 0
        self._served = 0
        self._misfit = 0  # the member found off the input's device last time: checked first
        self._table_key = None
        self._table = None
        self._n_programs = 0
        self._views: Dict[tuple, tuple] = {}  # buffer key -> (its tensor, one view per member)

    def weight(self, index: int, layer: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Member `index`'s float weight in x's dtype on x's device, or None (own path)."""
        if self.stopped or not ENABLED or self._members[index]() is not layer:
            return None  # (a copy of a model shares its layers' groups: copies use their own path)
        if not _runs_here(x):
            return None
        key = (x.device.index, x.dtype)
        buf = _BUFFERS.get(key)
        if buf is None or buf.owner is not self:
            buf = self._decode(x, key)
            if buf is None:
                return None
        self._served += 1
        fast_linear.KERNELS["triton:group-decode"] += 1
        return buf.views[index]

    def _sources(self, device) -> Optional[list]:
        members = [ref() for ref in self._members]
        misfit = members[self._misfit]
        if misfit is None or getattr(misfit, self._plans[self._misfit].source).device != device:
            return None
        out = []
        for i, (m, plan) in enumerate(zip(members, self._plans)):
            src = None if m is None else getattr(m, plan.source)
            if src is None or src.device != device or not src.is_contiguous():
                self._misfit = i if m is not None else self._misfit
                return None
            out.append((m, src, getattr(m, plan.scale) if plan.scale else None))
        return out

    def _decode(self, x: torch.Tensor, key: tuple) -> Optional[_Buffer]:
        sources = self._sources(x.device)
        if sources is None:
            return None
        buf = _BUFFERS.get(key)
        if buf is None or buf.tensor.numel() < self.total:
            size = max(self.total, _largest_group[0])
            buf = _BUFFERS[key] = _Buffer(torch.empty(size, dtype=x.dtype, device=x.device))
        previous = buf.owner
        if previous is not None and previous is not self and previous._served <= 1:
            previous._strikes += 1
            previous.stopped = previous._strikes >= STRIKES_TO_STOP
        try:
            kernels = _kernels()
            table = self._table_for(kernels, sources, buf.tensor)
            kernels.decode_group(table, buf.tensor, self._n_programs)
        except Exception as exc:  # noqa: BLE001 (Triton could not build it: the layers' own paths)
            fast_linear.triton_failed(exc)
            return None
        cached = self._views.get(key)
        if cached is None or cached[0] is not buf.tensor:
            cached = self._views[key] = (buf.tensor, [
                buf.tensor[o:o + p.n_weights].view(m.weight_shape)
                for o, p, (m, _, _) in zip(self._offsets, self._plans, sources)])
        buf.owner, buf.views = self, cached[1]
        self._served = 0
        return buf

    def _table_for(self, kernels, sources, out: torch.Tensor) -> torch.Tensor:
        key = (out.data_ptr(),) + tuple(src.data_ptr() for _, src, _ in sources)
        if key != self._table_key:
            entries, first = [], 0
            for (_, src, scale), plan, offset in zip(sources, self._plans, self._offsets):
                kind = kernels.ROWS_INT8 if plan.kind == INT8_ROWS else kernels.kind_of(plan.kind)
                entries.append((src.data_ptr(), offset, plan.n_weights, first, kind,
                                0 if scale is None else scale.data_ptr(), plan.row_len))
                first += kernels.programs(plan.n_weights)
            self._table = kernels.build_table(entries, out.device)
            self._n_programs = first
            self._table_key = key
        return self._table


def _runs_here(x: torch.Tensor) -> bool:
    return x.is_cuda and fast_linear.triton_ok(x)


def _plan_of(module: nn.Module) -> Optional[DecodePlan]:
    adapter = getattr(module, "adapter", None)
    if adapter is None or not hasattr(module, "weight_shape"):
        return None
    return adapter.decode_plan(module.spec, module.weight_shape)


class _CallOrder:
    """Stands in for the group of every candidate layer of one model until its first pass
    on the GPU is seen (the first layer called again ends it); then forms the groups."""

    def __init__(self, layers: List[nn.Module], plans: List[DecodePlan], max_weights: int):
        self._candidates = {id(m): (weakref.ref(m), p) for m, p in zip(layers, plans)}
        self._order: List[int] = []
        self._max_weights = max_weights

    def weight(self, index: int, layer: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        key = id(layer)
        entry = self._candidates.get(key)
        if entry is None or entry[0]() is not layer or not ENABLED or not _runs_here(x):
            return None
        if key not in self._order:
            self._order.append(key)
            return None
        self._form_groups()
        group = layer.decode_group
        return None if group is self or group is None else group.weight(layer.decode_index, layer, x)

    def _form_groups(self) -> None:
        run, size = [], 0
        for key in self._order:
            ref, plan = self._candidates[key]
            layer = ref()
            if layer is None:
                continue
            if run and size + plan.n_weights > self._max_weights:
                _make_group(run)
                run, size = [], 0
            run.append((layer, plan))
            size += plan.n_weights
        _make_group(run)
        for ref, _ in self._candidates.values():  # not called in the first pass: alone
            layer = ref()
            if layer is not None and layer.decode_group is self:
                layer.decode_group = None
        self._candidates.clear()


def _make_group(run: list) -> None:
    if len(run) < 2:
        for layer, _ in run:
            layer.decode_group = None
        return
    group = DecodeGroup([m for m, _ in run], [p for _, p in run])
    _largest_group[0] = max(_largest_group[0], group.total)
    for i, (layer, _) in enumerate(run):
        layer.decode_group, layer.decode_index = group, i


def link_decode_groups(root: nn.Module, max_weights: int = MAX_GROUP_WEIGHTS) -> int:
    """Makes the quantized layers of `root` whose format has a decode plan candidates for
    decode groups (formed after the model's first pass on the GPU, in call order, up to
    `max_weights` weights a group). Returns the number of candidates."""
    layers, plans = [], []
    for module in root.modules():
        plan = _plan_of(module)
        if plan is not None:
            layers.append(module)
            plans.append(plan)
    if len(layers) < 2:
        return 0
    order = _CallOrder(layers, plans, max_weights)
    for layer in layers:
        layer.decode_group, layer.decode_index = order, 0
    return len(layers)
