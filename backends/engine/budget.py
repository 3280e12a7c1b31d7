"""The choice under a byte budget: one option per layer, the smallest summed error whose
total size fits.

Each searched layer offers options (format, bytes, the squared error it is estimated to
add to the model's output: layer_options.py). Choosing one option per layer under a
byte budget is a multiple-choice knapsack, solved by dynamic programming over the bytes
beyond every layer's smallest option (on a grid of DP_UNITS steps, sizes rounded up so the
result always fits); the slack the grid leaves is then spent on the largest single
improvements that still fit. Deterministic: ties go to fewer bytes, then to the earlier
candidate (the candidate lists put the formats that run fastest on the device first), then
to the earlier layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .errors import BudgetUnreachable
from .layer_options import Option

DP_UNITS = 1 << 17  # grid of the dynamic program: it may leave up to (layers / DP_UNITS) of the slack


@dataclass(frozen=True)
class LayerChoices:
    name: str
    options: Tuple[Option, ...]  # KEEP first, then the candidates' order
    note: str = ""  # why the errors are what they are (e.g. never called)


@dataclass
class Choice:
    chosen: Dict[str, Option]
    nbytes: int  # searched layers plus fixed bytes
    error: float  # estimated squared error added to the model's output


def _ranked(choices: LayerChoices, rank: Dict[Optional[str], int]) -> List[Option]:
    """Options by bytes, then error, then rank: the order ties are settled in."""
    return sorted(choices.options, key=lambda o: (o.nbytes, o.error, rank.get(o.format_id, 99)))


def smallest_bytes(layers: Sequence[LayerChoices], fixed_bytes: int) -> int:
    return fixed_bytes + sum(min(o.nbytes for o in c.options) for c in layers)


def largest_useful_bytes(layers: Sequence[LayerChoices], fixed_bytes: int, rank) -> int:
    """The size at which every layer has its least-error option (more buys nothing)."""
    return fixed_bytes + sum(min(_ranked(c, rank), key=lambda o: o.error).nbytes for c in layers)


def choose(layers: Sequence[LayerChoices], budget: int, fixed_bytes: int = 0,
           rank: Optional[Dict[Optional[str], int]] = None, units: int = DP_UNITS) -> Choice:
    """One option per layer minimising the summed error with fixed + chosen bytes <= budget."""
    rank = rank or {}
    smallest = smallest_bytes(layers, fixed_bytes)
    if smallest > budget:
        raise BudgetUnreachable(smallest, budget)
    ordered = [_ranked(c, rank) for c in layers]
    chosen = _dynamic_program(ordered, budget - smallest, units)
    total = smallest + sum(o.nbytes - opts[0].nbytes for o, opts in zip(chosen, ordered))
    total = _spend_slack(layers, chosen, total, budget, rank)
    return Choice({c.name: o for c, o in zip(layers, chosen)}, total, sum(o.error for o in chosen))


def _dynamic_program(ordered: List[List[Option]], slack: int, units: int) -> List[Option]:
    """Exact on a grid: the bytes each option adds over its layer's smallest are rounded up
    to whole units of slack/units, so the choice always fits; it loses at most one unit a
    layer, which _spend_slack then uses."""
    unit = max(1, -(-slack // units))
    cells = slack // unit
    best = torch.zeros(cells + 1, dtype=torch.float64)  # least error using at most b units
    picks = torch.zeros((len(ordered), cells + 1), dtype=torch.uint8)  # < 256 options a layer
    for i, opts in enumerate(ordered):
        new = torch.full_like(best, float("inf"))
        for k, o in enumerate(opts):
            w = -(-(o.nbytes - opts[0].nbytes) // unit)
            if w > cells:
                continue
            cand = best[:cells + 1 - w] + o.error
            view = new[w:]
            better = cand < view  # strict: on equal error the earlier option stays
            torch.minimum(view, cand, out=view)
            picks[i, w:].masked_fill_(better, k)
        best = new
    chosen, b = [], cells
    for i in range(len(ordered) - 1, -1, -1):
        o = ordered[i][int(picks[i, b])]
        chosen.append(o)
        b -= -(-(o.nbytes - ordered[i][0].nbytes) // unit)
    return chosen[::-1]


def _spend_slack(layers, chosen, total, budget, rank) -> int:
    """Takes, while any fits, the single option change that removes the most error."""
    for _ in range(len(layers)):
        best = None
        for i, (c, cur) in enumerate(zip(layers, chosen)):
            for o in c.options:
                extra = o.nbytes - cur.nbytes
                removed = cur.error - o.error
                if removed <= 0 or total + extra > budget:
                    continue
                key = (-removed, extra, i, rank.get(o.format_id, 99))
                if best is None or key < best[0]:
                    best = (key, i, o, extra)
        if best is None:
            break
        _, i, o, extra = best
        chosen[i] = o
        total += extra
    return total
