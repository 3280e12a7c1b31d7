"""Random stand-in weights, generated where the model will run (a GPU fills billions of
values in milliseconds; no files are read).

Rules as bench/standins/fill.py: matrices and embeddings random, 1-D weights 1, biases 0.
Two draws for the random part: N(0, 0.02) (comparable with ANCHORS.md) and Student-t with
3 degrees of freedom scaled to std 0.02 (outliers like trained weights). Each tensor has
its own generator seeded from its name, so values do not depend on the other tensors.
"""
from __future__ import annotations

import torch

from .standins import fill as standin_fill

STD = 0.02
DISTS = ("normal", "heavy")


def _draw(shape, dist: str, gen: torch.Generator, device) -> torch.Tensor:
    out = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    if dist == "normal":
        return out.mul_(STD)
    if dist != "heavy":
        raise ValueError(f"unknown weight distribution {dist!r}; use one of {DISTS}")
    chi2 = torch.zeros_like(out)
    for _ in range(3):
        chi2.add_(torch.randn(shape, generator=gen, device=device, dtype=torch.float32).square_())
    # t(3) = N / sqrt(chi2_3 / 3) has variance 3
    return out.div_(chi2.div_(3).sqrt_()).mul_(STD / 3 ** 0.5)


def fill_state_dict(meta_sd: dict, dist: str, device, dtype=torch.float32, seed: int = 1) -> dict:
    """Real tensors for a meta state dict (keys and shapes kept)."""
    device = torch.device(device)
    out = {}
    for key, meta in meta_sd.items():
        shape = tuple(meta.shape)
        if not meta.is_meta:  # literal buffers (CLIP position ids) are kept as built
            out[key] = meta.to(device)
            continue
        if not meta.dtype.is_floating_point:
            out[key] = torch.zeros(shape, dtype=meta.dtype, device=device)
            continue
        kind = standin_fill.init_kind(key, shape)
        if kind == standin_fill.NORMAL:
            gen = torch.Generator(device=device)
            gen.manual_seed(standin_fill.tensor_seed(seed, key))
            value = _draw(shape, dist, gen, device)
        else:  # ones, zeros, constants: the stand-in rules' own values
            chunks = standin_fill.generate(kind, key, meta.numel(), torch.float32, seed, key)
            value = torch.cat(list(chunks)).reshape(shape).to(device)
        out[key] = value.to(dtype)
    return out
