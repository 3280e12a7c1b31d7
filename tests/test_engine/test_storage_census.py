"""The storage census (engine/storage_census.py): bytes by format and by device, logical
parameters and the 16-bit size of a small module tree, against figures worked out by hand
from the shapes. Pure torch, no ComfyUI (Memory Report's use of it inside ComfyUI, and
ComfyUI's own quantized tensors, are tested in test_nodes/test_memory_report.py)."""
from __future__ import annotations

import torch
import torch.nn as nn

from conftest import pack_module

census = pack_module("backends.engine.storage_census")
registry = pack_module("backends.engine.registry")
modules = pack_module("backends.engine.modules")


def _tree() -> nn.Module:
    root = nn.Module()
    root.a = nn.Linear(64, 32)  # fp32: (2048 + 32) x 4 = 8320 bytes
    root.b = nn.Linear(32, 16).half()  # fp16: (512 + 16) x 2 = 1056 bytes
    root.register_buffer("stats", torch.zeros(10, dtype=torch.bfloat16))  # bf16: 20 bytes
    root.c = nn.Linear(16, 16, bias=False)  # fp32: 256 x 4 = 1024 bytes ...
    root.d = nn.Linear(16, 16, bias=False)
    root.d.weight = root.c.weight  # ... tied: counted once
    adapter, spec = registry.get_format("torchao:int8wo")
    lin = nn.Linear(64, 32)
    parts = adapter.quantize(lin.weight.detach(), spec)  # int8 2048 bytes + fp32 scale 32 x 4
    root.q = modules.make_quantized(lin, adapter, spec, parts, lin.bias.detach())  # bias fp32 128
    root.m = nn.Linear(8, 8, device="meta")  # 72 parameters, no storage
    return root


def test_census_counts_bytes_by_format_and_device_as_worked_out_by_hand():
    """Shown able to fail: tensor_entry's `name == "weight" or name.startswith("weight_")` cut
    to `name == "weight"` (the int8 layer's scale counted as fp32) -> bytes_by_format
    {'fp32': 9600, 'torchao:int8wo': 2048} != {'fp32': 9472, 'torchao:int8wo': 2176}."""
    root = _tree()
    got = census.census_tree(root)
    assert got.bytes_by_format == {"fp32": 8320 + 1024 + 128, "fp16": 1056, "bf16": 20,
                                   "torchao:int8wo": 2048 + 128}
    stored = 8320 + 1024 + 128 + 1056 + 20 + 2048 + 128
    assert got.stored_bytes == stored
    assert got.bytes_by_device == {"cpu": stored, "meta": 0}
    assert (got.gpu_bytes, got.offloaded_bytes) == (0, stored)
    # a quantized weight counts its full shape, its scale none; buffers are not parameters
    parameters = 2080 + 528 + 256 + (2048 + 32) + 72
    assert got.parameters == parameters
    assert got.bytes_at_16bit == 2 * (parameters + 10)
    assert got.saving_vs_16bit == 2 * (parameters + 10) - stored


def test_shared_bytes_are_those_counted_in_more_than_one_tree():
    """A subtree counted beside its whole tree is shared; a clone of a tensor is not.
    Shown able to fail: shared_bytes adding `nbytes` for first sightings too (`extra +=
    nbytes` beside `seen[key] = nbytes`) -> 21044 (every byte of both trees) != 8320."""
    root = _tree()
    whole, part = census.census_tree(root), census.census_tree(root.a)
    assert census.shared_bytes(whole, part) == 8320
    copy = nn.Linear(64, 32)
    copy.load_state_dict(root.a.state_dict())
    assert census.shared_bytes(whole, census.census_tree(copy)) == 0
