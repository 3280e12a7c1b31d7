"""Weight draws and error measure shared by the backend tests."""
from __future__ import annotations

import torch


def gaussian(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.02


def heavy_tailed(shape, seed=1):
    """Student-t with 3 degrees of freedom, scaled to (empirical) std 0.02."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((3, *shape), generator=g).pow(2).sum(0)
    t = z / (chi2 / 3).sqrt()
    return t / t.std() * 0.02


def rel_err(a, b):
    """||a - b|| / ||b|| (Frobenius norms), computed in float32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
