"""Which layers a budget fit searches and what each can become (engine/fit_layers.py): the
candidate checks, the bytes that stay fixed, the smallest reachable size, and every searched
layer measured in every candidate. Pure torch, no ComfyUI (the fit end to end is in
test_fit.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import pack_module
from harness.fit_tower import calibrated_tower

fit = pack_module("backends.engine.fit")
fit_layers = pack_module("backends.engine.fit_layers")
quantize = pack_module("backends.engine.quantize")
recipes = pack_module("backends.engine.recipes")
errors = pack_module("backends.engine.errors")

# GGUF block sizes in bytes (ggml's block structs): (weights per block, bytes per block)
Q4_0, Q5_K, Q2_K = (32, 18), (256, 176), (256, 84)


def _gguf_bytes(rows: int, width: int, block) -> int:
    weights, nbytes = block
    return rows * width // weights * nbytes


def test_each_error_is_weighed_by_how_strongly_the_layer_reaches_the_output():
    """`loud` and `quiet` hold the same weights and see the same input; `loud`'s output
    reaches the model's output 32x stronger, so each of its errors must be estimated 32^2 =
    1024x larger. Shown able to fail: Sensitivity.weight_error ignoring the Fisher (sum of
    dW^2 alone) -> the ratio is 1."""
    net, calibration, _, _ = calibrated_tower(fit, quantize.QUANTIZABLE)
    searched = {"loud": net.loud, "quiet": net.quiet}
    measured = fit_layers.measure_layers(searched, calibration.rows, calibration.sensitivity,
                                         fit_layers.GGUF_LADDER, recipes.Recipe("test", min_params=0))
    assert [c.name for c in measured] == ["loud", "quiet"]
    loud, quiet = ({o.format_id: o.error for o in c.options if o.format_id} for c in measured)
    assert list(loud) == list(fit_layers.GGUF_LADDER)
    for fmt in loud:
        assert loud[fmt] / quiet[fmt] == pytest.approx(1024, rel=1e-3), fmt


class _Mixed(nn.Module):
    """Every kind of weight fixed_parts sorts: non-layer parameters (one tied), a layer the
    recipe keeps (bf16), a tiny layer, an excluded layer, and two searched layers."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 64)
        self.emb2 = nn.Embedding(10, 64)
        self.emb2.weight = self.emb.weight
        self.norm = nn.LayerNorm(64)
        self.scale = nn.Parameter(torch.ones(3))
        self.first = nn.Linear(64, 128).to(torch.bfloat16)
        self.small = nn.Linear(8, 8)
        self.skip = nn.Linear(32, 32, bias=False)
        self.body = nn.Linear(128, 128)
        self.conv = nn.Conv2d(4, 8, 3)


def test_fixed_bytes_are_what_the_search_cannot_change():
    """Shown able to fail: fixed_parts summing the others as a list (a tied parameter twice)
    -> 2560 bytes too many."""
    recipe = recipes.Recipe("test", keep=(r"^first$",), min_params=100)
    searched, kept, fixed = fit_layers.fixed_parts(_Mixed(), recipe, exclude="^skip$")
    assert list(searched) == ["body", "conv"]
    assert set(kept) == {"first", "small", "skip"}
    assert "recipe" in kept["first"] and "tiny" in kept["small"] and "exclude" in kept["skip"]
    embedding, norm, scale = 10 * 64 * 4, 2 * 64 * 4, 3 * 4  # the tied embedding once
    first, small, skip = (128 * 64 + 128) * 2, (8 * 8 + 8) * 4, 32 * 32 * 4
    assert fixed == embedding + norm + scale + first + small + skip


def test_the_nominal_smallest_size_applies_fallbacks_and_the_final_projection_rule():
    """Each layer in its smallest candidate at the format's block arithmetic: 256 wide in
    gguf:Q2_K, 320 wide (not whole 256-blocks) in Q2_K's fallback gguf:Q4_0, the final
    projection in gguf:Q5_K (the 4-bit and smaller formats leave it kept).
    Shown able to fail: _is_final returning False -> 2944 bytes too few (the final
    projection counted in gguf:Q2_K)."""
    layers = {"a": nn.Linear(256, 64), "odd": nn.Linear(320, 64, bias=False), "final": nn.Linear(256, 32)}
    recipe = recipes.Recipe("test", final_projection=(r"^final$",), min_params=0)
    expected = (1000 + _gguf_bytes(64, 256, Q2_K) + 64 * 4 + _gguf_bytes(64, 320, Q4_0)
                + _gguf_bytes(32, 256, Q5_K) + 32 * 4)
    assert fit_layers.nominal_smallest(layers, 1000, fit_layers.GGUF_LADDER, recipe) == expected


def test_candidates_are_checked_before_any_work():
    """An empty list, a format QuantKit can only read, and one the run device cannot run
    each stop the fit with their own error. Shown able to fail: check_candidates without
    its read_only check -> DID NOT RAISE for gguf:IQ4_XS."""
    with pytest.raises(errors.QuantKitError, match="No candidate formats given"):
        fit_layers.check_candidates([], "cpu")
    with pytest.raises(errors.QuantKitError, match=r"'gguf:IQ4_XS' can be read .* Remove it"):
        fit_layers.check_candidates(["gguf:Q8_0", "gguf:IQ4_XS"], "cpu")
    with pytest.raises(errors.FormatUnsupported, match="torchao:fp8dq"):
        fit_layers.check_candidates(["gguf:Q8_0", "torchao:fp8dq"], "cpu")
    fit_layers.check_candidates(fit_layers.default_candidates("cpu"), "cpu")
