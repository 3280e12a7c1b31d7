"""How errors reach the output (engine/output_sensitivity.py), checked against closed forms:
for y = W x the Fisher diagonal is E_v[(sum_t v_t x_t)^2] = sum_t x_t^2 per input column
and ||J||_F^2 is the number of outputs; through a second layer, the chain rule."""
from __future__ import annotations

import torch
import torch.nn as nn

from conftest import pack_module

sens = pack_module("backends.engine.output_sensitivity")


def _run(root, layers, replays, probes):
    return sens.layer_sensitivity(root, layers, replays, probes=probes, seed=3)


def test_fisher_and_gain_of_a_linear_layer_match_the_closed_form():
    """Shown able to fail: the backward recording grad.abs().sum() instead of its squares ->
    the gain is 0.80x the output count; pooling with .sum(-1) instead of .mean(-1) -> the
    Fisher is 8x too large (1232 vs 153: one block of 8 columns)."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 6, bias=False)
    x = torch.randn(50, 8) * torch.linspace(0.1, 3.0, 8)
    got = _run(layer, {"l": layer}, [lambda: layer(x)], probes=400)["l"]
    assert got.block == 8  # widest block dividing 8
    expected = x.square().sum(0).mean()  # every row: mean over the single block of 8 columns
    assert got.fisher.shape == (6, 1)
    # estimates from 400 Gaussian probes (a claim with its sampling spread, not a tolerance):
    # the Fisher's mean over 6 rows averages 2400 independent probe terms, each at most as
    # spread as a chi-square(1): relative spread <= sqrt(2 / 2400) = 0.029, so 0.06 is two
    # spreads (the seed is fixed); the gain averages 400 x 300 of them, spread 0.004
    torch.testing.assert_close(got.fisher.mean(), expected, rtol=0.06, atol=0)
    assert abs(got.gain / (50 * 6) - 1) < 0.05


def test_weight_error_follows_the_chain_rule_through_a_second_layer():
    """The estimate of a weight error in the first of two linear layers is ||B dW X^T||^2
    in expectation over independent weight errors: the Fisher times dW^2. Shown able to
    fail: _input_grad returning grad @ w.T (wrong orientation) -> RuntimeError (shapes
    30x4 and 12x4); returning zeros -> the first layer's estimate is 0."""
    torch.manual_seed(1)
    a, b = nn.Linear(16, 12, bias=False), nn.Linear(12, 4, bias=False)
    root = nn.Sequential(a, b)
    x = torch.randn(30, 16)
    got = _run(root, {"a": a, "b": b}, [lambda: root(x)], probes=300)
    draws = [torch.randn(12, 16) * 0.01 for _ in range(200)]
    truth = sum(float((x @ d.T @ b.weight.detach().T).square().sum()) for d in draws) / len(draws)
    estimate = sum(got["a"].weight_error(d) for d in draws) / len(draws)
    assert abs(estimate / truth - 1) < 0.15, (estimate, truth)
    assert got["b"].gain > 0 and got["a"].gain > 0


def test_inference_weights_work_and_the_tree_is_restored():
    """ComfyUI builds weights inside torch.inference_mode; autograd may not save them.
    Shown able to fail: the recording forward computing `_plain_forward(layer, x) + anchor`
    (autograd saving the weight) -> RuntimeError: inference tensors cannot be saved for
    backward; _swap_small_tensors skipped -> the same error from the LayerNorm's weight;
    the finally-block not deleting the instance forward -> 'forward' stays in the layer's
    __dict__."""
    with torch.inference_mode():
        root = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Conv1d(1, 2, 3, padding=1))
        x = torch.randn(4, 1, 8)
    params = [id(p) for p in root.parameters()]
    layers = {"0": root[0], "2": root[2]}
    got = _run(root, layers, [lambda: root(x.clone())], probes=2)
    assert got["0"].fisher is not None and got["2"].fisher is not None
    assert [id(p) for p in root.parameters()] == params
    assert "forward" not in root[0].__dict__ and "forward" not in root[2].__dict__
    with torch.no_grad():
        root(x)  # runs as before


def test_a_layer_never_called_has_no_sensitivity():
    """Shown able to fail: records created with gain=1.0 -> the unused layer reports a gain."""
    used, unused = nn.Linear(4, 4), nn.Linear(4, 4)
    got = _run(used, {"used": used, "unused": unused}, [lambda: used(torch.randn(2, 4))], probes=1)
    assert got["unused"].gain == 0 and got["unused"].fisher is None
    assert got["unused"].weight_error(torch.ones(4, 4)) == 0.0
