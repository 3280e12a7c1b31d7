"""Fit a module tree to a byte budget, end to end: a calibration pass the caller runs,
the gradient replay of a few of its calls, every searched layer measured in every
candidate format (fit_layers.py), the choice (budget.py, fit_plan.py), and quantize_tree
applying it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn

from .calibration import LayerInputs, RootCalls
from .fit_layers import check_candidates, fixed_parts, measure_layers
from .fit_plan import FitPlan, check_plan_bytes, layer_plan, plan_fit
from .output_sensitivity import Sensitivity, layer_sensitivity
from .quantize import quantize_tree
from .recipes import Recipe
from .report import QuantReport


@dataclass
class Calibration:
    rows: Dict[str, Optional[torch.Tensor]]  # layer -> sampled input rows (None: never ran)
    sensitivity: Dict[str, Sensitivity]  # layer -> how its errors reach the root's output
    output_energy: float  # squared norm of the replayed outputs
    calls: int  # root calls during the pass


def normal_copies(obj):
    """Tensors in nested tuples/lists/dicts cloned outside inference mode (autograd may save
    them); everything else shared."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (list, tuple)):
        return type(obj)(normal_copies(o) for o in obj)
    if isinstance(obj, dict):
        return {k: normal_copies(v) for k, v in obj.items()}
    return obj


def calibrate(root: nn.Module, layers: Dict[str, nn.Module], run: Callable[[], object], *,
              output_of: Callable[[object], torch.Tensor] = lambda out: out,
              rows_per_call: int = 64, replays: int = 2, replay_every: int = 1,
              probes: int = 2, seed: int = 0) -> Calibration:
    """Runs `run()` (which calls `root` one or more times) with `layers` recorded, then
    replays `replays` of the recorded root calls (every `replay_every`-th) with gradients.
    `output_of(root(...))`: the tensor whose error counts (for roots that return more)."""
    with LayerInputs(layers, rows_per_call=rows_per_call) as recorder, \
            RootCalls(root, keep=replays, every=replay_every) as root_calls:
        run()
    calls = root_calls.seen
    energy = [0.0]  # summed once per probe: divided below

    def replay_fn(args, kwargs):
        def replay():
            with torch.inference_mode(False):
                a, kw = normal_copies(args), normal_copies(kwargs)
            out = output_of(root(*a, **kw))
            energy[0] += float(out.detach().double().square().sum())
            return out
        return replay

    sensitivity = layer_sensitivity(root, layers, [replay_fn(a, kw) for a, kw in root_calls.calls],
                                    probes=probes, seed=seed)
    rows = {n: s.matrix() for n, s in recorder.samples.items()}
    return Calibration(rows, sensitivity, energy[0] / probes, calls)


def fit_tree(root: nn.Module, recipe: Recipe, budget: int, calibration: Calibration,
             candidates: Sequence[str], *, target: str, label: str, exclude: Optional[str] = None,
             run_device="cpu", work_device="cpu", weight_of=None, layer_cls=None,
             measure_progress=None, quantize_progress=None):
    """(FitPlan, QuantReport): `root` quantized in place (call it on a clone) to the plan
    with the least estimated output error within `budget` bytes."""
    check_candidates(candidates, run_device)
    searched, kept, fixed = fixed_parts(root, recipe, exclude)
    layers = measure_layers(searched, calibration.rows, calibration.sensitivity, candidates, recipe,
                            weight_of=weight_of, work_device=work_device, progress=measure_progress)
    plan = plan_fit(layers, kept, fixed, budget, calibration.output_energy, candidates)
    report = apply_plan(root, plan, recipe, target=target, label=label, run_device=run_device,
                        work_device=work_device, weight_of=weight_of, layer_cls=layer_cls,
                        progress=quantize_progress)
    return plan, report


def apply_plan(root: nn.Module, plan: FitPlan, recipe: Recipe, *, target: str, label: str,
               run_device="cpu", work_device="cpu", weight_of=None, layer_cls=None,
               progress=None) -> QuantReport:
    report = quantize_tree(root, label, recipe, target=target, run_device=run_device,
                           work_device=work_device, weight_of=weight_of, layer_cls=layer_cls,
                           progress=progress, plan=layer_plan(plan))
    check_plan_bytes(plan, report)
    return report
