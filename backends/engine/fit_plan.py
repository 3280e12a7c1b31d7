"""What a budget fit chose, and how it is told: the plan (a format per layer, bytes,
estimated error), the choice made from measured layers, and the lines the node and
Memory Report show."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from .budget import LayerChoices, choose, largest_useful_bytes, smallest_bytes
from .errors import QuantKitError
from .layer_options import KEEP
from .quantize import LayerPlan
from .report import QuantReport


@dataclass
class FitPlan:
    """What fit_tree chose, and the figures its report shows."""
    formats: Dict[str, Optional[str]]  # searched layer -> format id, or None: kept as stored
    reasons: Dict[str, str]  # layer -> why (searched layers: the estimated error share)
    budget: int
    nbytes: int
    smallest: int
    largest_useful: int
    fixed_bytes: int
    estimated_error: float  # relative: sqrt(summed squared error / output energy)
    output_energy: float
    layer_bytes: Dict[str, int] = field(default_factory=dict)
    layer_errors: Dict[str, float] = field(default_factory=dict)  # estimated squared error

    def bytes_by_format(self) -> Dict[str, int]:
        out = Counter()
        for name, fmt in self.formats.items():
            out[fmt or "kept"] += self.layer_bytes[name]
        return dict(out)

    def layers_by_format(self) -> Dict[str, int]:
        return dict(Counter(fmt or "kept" for fmt in self.formats.values()))


def plan_fit(layers: List[LayerChoices], kept: Dict[str, str], fixed_bytes: int,
             budget: int, output_energy: float, candidates: Sequence[str]) -> FitPlan:
    rank = {KEEP: 0, **{f: i + 1 for i, f in enumerate(candidates)}}
    choice = choose(layers, budget, fixed_bytes, rank)
    errors = {c.name: choice.chosen[c.name].error for c in layers}
    total_error = sum(errors.values())
    reasons = dict(kept)
    for c in layers:
        share = errors[c.name] / total_error if total_error > 0 else 0.0
        reasons[c.name] = c.note or f"{100 * share:.1f}% of the estimated error"
    return FitPlan(
        formats={c.name: choice.chosen[c.name].format_id for c in layers}, reasons=reasons,
        budget=budget, nbytes=choice.nbytes, smallest=smallest_bytes(layers, fixed_bytes),
        largest_useful=largest_useful_bytes(layers, fixed_bytes, rank), fixed_bytes=fixed_bytes,
        estimated_error=(total_error / output_energy) ** 0.5 if output_energy > 0 else float("nan"),
        output_energy=output_energy,
        layer_bytes={c.name: choice.chosen[c.name].nbytes for c in layers}, layer_errors=errors)


def layer_plan(plan: FitPlan) -> LayerPlan:
    return LayerPlan(plan.formats, plan.reasons, summary_lines(plan, gib))


def check_plan_bytes(plan: FitPlan, report: QuantReport) -> None:
    """The plan's bytes are counted as the report counts them: a difference is a bug."""
    if report.bytes_after != plan.nbytes:
        raise QuantKitError(f"{report.target}: the budget plan counted {plan.nbytes} bytes but the "
                            f"quantized model takes {report.bytes_after}. This is a QuantKit bug; "
                            f"please report it. Quantize Model with one format still works.")


def gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def summary_lines(plan: FitPlan, size: Callable[[int], str]) -> List[str]:
    """What was chosen and why, for the node and Memory Report."""
    lines = [f"budget {size(plan.budget)}: {size(plan.nbytes)} used "
             f"(reachable {size(plan.smallest)} - {size(plan.largest_useful)}; "
             f"{size(plan.fixed_bytes)} fixed: kept layers and non-layer weights)",
             f"estimated output error {100 * plan.estimated_error:.2f}% (relative, first-order, "
             f"from the calibration pass)"]
    counts = plan.layers_by_format()
    for fmt, nbytes in sorted(plan.bytes_by_format().items(), key=lambda kv: -kv[1]):
        lines.append(f"  {fmt}: {counts[fmt]} layers, {size(nbytes)}")
    worst = sorted(plan.layer_errors.items(), key=lambda kv: -kv[1])[:3]
    if worst and plan.output_energy > 0:
        lines.append("largest estimated error shares: " + ", ".join(
            f"{name} ({plan.formats[name] or 'kept'}, {plan.reasons[name]})" for name, _ in worst))
    return lines
