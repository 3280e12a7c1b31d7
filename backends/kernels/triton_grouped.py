"""One Triton launch that decodes the weights of several layers into one buffer (NVIDIA GPUs).

Per-layer decoding queues a decode kernel (and its output allocation) before every matrix
product; on hosts that launch kernels slowly that, not the GPU, sets a UNet's step time.
`decode_group` decodes a whole group of layers (see decode_groups.py) in one launch: a small
table on the device lists, per layer, where its quantized data is, where its output goes in
the shared buffer, how many weights it has and how it is encoded. Each program decodes
BLOCK weights of one layer, with the same arithmetic as the per-layer kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_gguf import TYPES, _decode_elements
from .triton_8bit import _launch

ROWS_INT8 = 100  # int8 rows with one float32 scale per row (torchao:int8wo)
ENTRY = 8  # int64 fields per layer: source, output offset, weights, first program, kind, scale, row length
_BLOCK = 1024


@triton.jit
def _group_kernel(table_ptr, out_ptr, n_layers, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    layer = 0
    for i in range(1, n_layers):
        layer += (pid >= tl.load(table_ptr + i * 8 + 3)).to(tl.int32)
    e = table_ptr + layer * 8
    src = tl.load(e).to(tl.pointer_type(tl.uint8))
    out = out_ptr + tl.load(e + 1)
    n_out = tl.load(e + 2)
    local = pid - tl.load(e + 3)
    kind = tl.load(e + 4)
    if kind == 100:
        scale = tl.load(e + 5).to(tl.pointer_type(tl.float32))
        row_len = tl.load(e + 6)
        o = local.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = o < n_out
        q = tl.load(src + o, mask=inside, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        s = tl.load(scale + o // row_len, mask=inside, other=0.0)
        tl.store(out + o, (q * s).to(out_ptr.dtype.element_ty), mask=inside)
    elif kind == 0:
        _decode_elements(src, out, n_out, local, 0, 32, 34, BLOCK)
    elif kind == 1:
        _decode_elements(src, out, n_out, local, 1, 32, 18, BLOCK)
    elif kind == 2:
        _decode_elements(src, out, n_out, local, 2, 32, 20, BLOCK)
    elif kind == 3:
        _decode_elements(src, out, n_out, local, 3, 32, 22, BLOCK)
    elif kind == 4:
        _decode_elements(src, out, n_out, local, 4, 32, 24, BLOCK)
    elif kind == 5:
        _decode_elements(src, out, n_out, local, 5, 256, 144, BLOCK)
    elif kind == 6:
        _decode_elements(src, out, n_out, local, 6, 256, 176, BLOCK)
    elif kind == 7:
        _decode_elements(src, out, n_out, local, 7, 256, 210, BLOCK)
    elif kind == 8:
        _decode_elements(src, out, n_out, local, 8, 256, 110, BLOCK)
    else:
        _decode_elements(src, out, n_out, local, 9, 256, 84, BLOCK)


# The branches spell out TYPES (backends/gguf/types.py's kernel ids, block lengths and sizes)
# rather than loop over a constexpr tuple, which Triton before 3.2 cannot compile: checked here.
assert {k: (i, b, s) for k, (i, b, s) in TYPES.items()} == {
    "Q8_0": (0, 32, 34), "Q4_0": (1, 32, 18), "Q4_1": (2, 32, 20), "Q5_0": (3, 32, 22),
    "Q5_1": (4, 32, 24), "Q4_K": (5, 256, 144), "Q5_K": (6, 256, 176), "Q6_K": (7, 256, 210),
    "Q3_K": (8, 256, 110), "Q2_K": (9, 256, 84)}


def kind_of(qtype: str) -> int:
    """The kernel's id for a GGML type the group kernel decodes (KeyError otherwise)."""
    return TYPES[qtype][0]


def programs(n_weights: int) -> int:
    return triton.cdiv(n_weights, _BLOCK)


def build_table(entries, device) -> torch.Tensor:
    """entries: (source address, output offset, weights, first program, kind, scale address,
    row length) per layer -> the [layers, ENTRY] int64 table on `device`."""
    rows = [list(e) + [0] * (ENTRY - len(e)) for e in entries]
    return torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=False)


def decode_group(table: torch.Tensor, out: torch.Tensor, n_programs: int) -> None:
    """Runs the group kernel: every layer of `table` decoded into flat `out`."""
    _launch(_group_kernel, (n_programs,), (table, out, table.shape[0]), {"BLOCK": _BLOCK},
            num_warps=4, num_stages=1)
