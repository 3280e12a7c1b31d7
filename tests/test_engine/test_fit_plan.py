"""What a budget fit chose and how it is told (engine/fit_plan.py), on hand-made options
whose best choice is worked out by hand: the plan's bytes, reasons and estimated error, the
lines the node and Memory Report show, and the check against the quantized model's bytes.
Pure torch, no ComfyUI (the choice itself is tested in test_budget.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from conftest import pack_module

fit_plan = pack_module("backends.engine.fit_plan")
errors = pack_module("backends.engine.errors")
LayerChoices = pack_module("backends.engine.budget").LayerChoices
Option = pack_module("backends.engine.layer_options").Option

NEVER_RAN = "never ran during calibration: smallest option"


@pytest.fixture(scope="module")
def plan():
    """Fixed 50 bytes, budget 1450: the least error is `a` kept (1000 bytes, error 0), `b` and
    `c` in f2 (200 each; b's error 2). Every other choice within 1450 bytes errs more (a and
    b in f1: 4 + 1). Smallest: 50 + 3 x 200; largest useful: a and b kept, c's cheapest."""
    layers = [LayerChoices("a", (Option(None, 1000, 0.0), Option("f1", 300, 4.0), Option("f2", 200, 9.0))),
              LayerChoices("b", (Option(None, 1000, 0.0), Option("f1", 300, 1.0), Option("f2", 200, 2.0))),
              LayerChoices("c", (Option(None, 1000, 0.0), Option("f2", 200, 0.0)), NEVER_RAN)]
    kept = {"k": "recipe keeps it in high precision"}
    return fit_plan.plan_fit(layers, kept, 50, 1450, output_energy=8.0, candidates=("f1", "f2"))


def test_the_plan_holds_the_choice_its_bytes_and_its_estimated_error(plan):
    """Shown able to fail: estimated_error without the square root -> 0.25, not 0.5;
    the share computed over the layer count (errors[name] / len(layers)) -> b reads 66.7%."""
    assert plan.formats == {"a": None, "b": "f2", "c": "f2"}
    assert (plan.nbytes, plan.smallest, plan.largest_useful, plan.fixed_bytes) == (1450, 650, 2250, 50)
    assert plan.estimated_error == pytest.approx((2.0 / 8.0) ** 0.5, rel=1e-12)
    assert plan.reasons == {"k": "recipe keeps it in high precision", "a": "0.0% of the estimated error",
                            "b": "100.0% of the estimated error", "c": NEVER_RAN}
    assert plan.bytes_by_format() == {"kept": 1000, "f2": 400}
    assert plan.layers_by_format() == {"kept": 1, "f2": 2}


def test_the_summary_tells_sizes_formats_and_the_largest_error_shares(plan):
    """Shown able to fail: the format lines sorted by bytes ascending (`key=lambda kv:
    kv[1]`) -> 'f2' is listed before 'kept'."""
    assert fit_plan.summary_lines(plan, lambda n: f"{n} B") == [
        "budget 1450 B: 1450 B used (reachable 650 B - 2250 B; 50 B fixed: kept layers and non-layer weights)",
        "estimated output error 50.00% (relative, first-order, from the calibration pass)",
        "  kept: 1 layers, 1000 B",
        "  f2: 2 layers, 400 B",
        "largest estimated error shares: b (f2, 100.0% of the estimated error), "
        "a (kept, 0.0% of the estimated error), c (f2, never ran during calibration: smallest option)"]


def test_a_plan_the_quantized_model_does_not_match_is_reported_as_a_bug(plan):
    """Shown able to fail: check_plan_bytes comparing with `>` (a model smaller than the
    plan passes) -> DID NOT RAISE for 1449 bytes."""
    fit_plan.check_plan_bytes(plan, SimpleNamespace(bytes_after=1450, target="model"))
    for wrong in (1449, 1451):
        with pytest.raises(errors.QuantKitError, match=rf"counted 1450 bytes but the quantized model takes {wrong}"):
            fit_plan.check_plan_bytes(plan, SimpleNamespace(bytes_after=wrong, target="model"))
