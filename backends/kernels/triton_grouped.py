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
# (kernel id, weights per block, bytes per block) of each GGML type: one branch each, unrolled
_LAYOUTS = tl.constexpr(tuple(TYPES.values()))
_N_LAYOUTS = tl.constexpr(len(TYPES))


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
    else:
        for t in tl.static_range(_N_LAYOUTS):
            if kind == _LAYOUTS[t][0]:
                _decode_elements(src, out, n_out, local, _LAYOUTS[t][0], _LAYOUTS[t][1],
                                 _LAYOUTS[t][2], BLOCK)


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
