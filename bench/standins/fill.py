"""Deterministic values for random-weight stand-ins.

Rules (they keep activations finite through full-depth models): matrices, convolutions and
embeddings get normal(0, 0.02); 1-D weights (LayerNorm, GroupNorm, RMSNorm scales) get 1;
biases get 0. Every tensor draws from its own generator, seeded from the run seed and a
name, so values do not depend on which other tensors a file holds or their order.
"""
from __future__ import annotations

import math
import re
import zlib
from typing import Iterator

import torch

STD = 0.02
CHUNK = 1 << 23  # elements generated at a time: part of the recipe (changing it changes values)

NORMAL, ONES, ZEROS, CONST = "normal", "ones", "zeros", "const"

# CLIP's temperature (ln 100): unused for text encoding but kept plausible.
_CONSTANTS = {"logit_scale": math.log(100.0)}

# T5 applies no 1/sqrt(d) before its softmax (trained weights absorb it). With N(0, 0.02)
# projections its attention logits would have std ~13: saturated, so the output flips with
# any rounding, which no real T5 does. Scaling the attention's input norm by 1/4 brings the
# logits to std ~0.8 (0.25 is exact in float8).
_T5_ATTENTION_NORM = re.compile(r"(^|\.)block\.\d+\.layer\.0\.layer_norm\.weight$")
T5_ATTENTION_NORM_SCALE = 0.25


def init_kind(key: str, shape: tuple[int, ...]) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if leaf in _CONSTANTS or _T5_ATTENTION_NORM.search(key):
        return CONST
    if leaf == "bias" or leaf.endswith("_bias") or leaf == "beta":
        return ZEROS
    if len(shape) <= 1 and (leaf == "weight" or leaf in ("gamma", "scale")):
        return ONES
    return NORMAL


def tensor_seed(seed: int, name: str) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode("utf-8"))) % (1 << 63)


def generate(kind: str, key: str, numel: int, dtype: torch.dtype, seed: int, seed_name: str) -> Iterator[torch.Tensor]:
    """Yield the tensor's values as flat chunks already cast to `dtype`."""
    if kind == NORMAL:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(tensor_seed(seed, seed_name))
        buf = torch.empty(min(numel, CHUNK), dtype=torch.float32)
        done = 0
        while done < numel:
            n = min(CHUNK, numel - done)
            part = buf[:n]
            torch.randn(n, generator=gen, out=part)
            part.mul_(STD)
            yield part.to(dtype)
            done += n
        return
    if kind == CONST:
        value = T5_ATTENTION_NORM_SCALE if _T5_ATTENTION_NORM.search(key) else _CONSTANTS[key.rsplit(".", 1)[-1]]
    elif kind == ONES:
        value = 1.0
    elif kind == ZEROS:
        value = 0.0
    else:
        raise ValueError(f"unknown init kind {kind!r} for {key}")
    done = 0
    while done < numel:
        n = min(CHUNK, numel - done)
        yield torch.full((n,), value, dtype=dtype)
        done += n
