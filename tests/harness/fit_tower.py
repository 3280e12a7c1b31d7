"""A small torch model with layers of unequal importance, calibrated once: what the budget
fit's engine tests (test_engine/test_fit.py, test_fit_layers.py) measure and fit."""
from __future__ import annotations

import torch
import torch.nn as nn


class Tower(nn.Module):
    """Residual MLP blocks, then twin layers of the same shape whose outputs are mixed in
    at very different strengths: `loud`'s errors reach the output 32x stronger."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(256, 512)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512))
                                    for _ in range(3))
        self.loud, self.quiet = nn.Linear(512, 512), nn.Linear(512, 512)
        self.out = nn.Linear(512, 256)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.02) if p.dim() > 1 else p.zero_()
            self.quiet.weight.copy_(self.loud.weight)  # twins: only their reach differs

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        h = h + 8 * self.loud(h) + 0.25 * self.quiet(h)
        return self.out(h)


def calibration_input() -> torch.Tensor:
    return torch.randn(64, 256, generator=torch.Generator().manual_seed(1))


def calibrated_tower(fit, quantizable):
    """(tower, its calibration, held-out inputs, the float model's output on them).
    fit: the engine's fit module; quantizable: the layer types it searches."""
    net = Tower()
    held_out = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = net(held_out)
    calib = calibration_input()
    calibration = fit.calibrate(net, tower_layers(net, quantizable), lambda: net(calib))
    return net, calibration, held_out, reference


def tower_layers(net: nn.Module, quantizable) -> dict:
    return {n: m for n, m in net.named_modules() if isinstance(m, quantizable)}
