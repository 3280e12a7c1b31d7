"""One layer's choices (engine/layer_options.py): the formats a layer's shape can take, the
bytes each option stores and the output error each is estimated to add. Expected values are
the formats' own arithmetic written out here (ggml's block sizes, Q8_0's and int8's rounding),
not the adapters' code. Pure torch, no ComfyUI."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import pack_module
from harness.int8_reference import int8_rows

layer_options = pack_module("backends.engine.layer_options")
Sensitivity = pack_module("backends.engine.output_sensitivity").Sensitivity

# ggml's block structs: (weights per block, bytes per block)
GGUF_BLOCKS = {"gguf:Q8_0": (32, 34), "gguf:Q6_K": (256, 210), "gguf:Q4_K": (256, 144), "gguf:Q2_K": (256, 84)}


def _weights(rows: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_each_option_stores_the_formats_block_bytes_plus_the_bias():
    """A bf16 layer: KEEP is its bf16 weight and bias; each GGUF option is whole blocks of
    the format plus the bias as stored. on_parts sees each format once, in order.
    Shown able to fail: the bias left out of the quantized options (`parts_nbytes(parts)`
    alone) -> 128 bytes too few for gguf:Q8_0."""
    module = nn.Linear(512, 64).to(torch.bfloat16)
    seen = []
    options = layer_options.layer_options(module, module.weight, None, Sensitivity(), list(GGUF_BLOCKS),
                                          on_parts=lambda f, parts: seen.append(f))
    bias = 64 * 2
    assert options[0] == layer_options.Option(layer_options.KEEP, 64 * 512 * 2 + bias, 0.0)
    for option, (fmt, (weights, nbytes)) in zip(options[1:], GGUF_BLOCKS.items()):
        assert (option.format_id, option.nbytes) == (fmt, 64 * 512 // weights * nbytes + bias)
    assert seen == list(GGUF_BLOCKS)


def test_a_shape_takes_the_format_its_fallback_or_nothing():
    """K-quants need whole 256-blocks; their fallbacks (gguf:Q4_K -> gguf:Q4_1) whole
    32-blocks. Shown able to fail: candidate_formats without its `resolved not in out`
    check -> ['gguf:Q4_1', 'gguf:Q4_1', 'gguf:Q8_0'] for the 320-wide layer."""
    resolve = layer_options.resolve_candidate
    assert resolve("gguf:Q4_K", (8, 512)) == "gguf:Q4_K"
    assert resolve("gguf:Q4_K", (8, 320)) == "gguf:Q4_1"
    assert resolve("gguf:Q4_K", (8, 100)) is None  # 100 is not whole 32-blocks either
    assert resolve("gguf:Q4_K", (8, 16, 4, 4)) == "gguf:Q4_K"  # a convolution: flattened width 16 * 4 * 4
    asked = ["gguf:Q4_K", "gguf:Q4_1", "gguf:Q8_0"]
    assert layer_options.candidate_formats(asked, (8, 320)) == ["gguf:Q4_1", "gguf:Q8_0"]
    # a final projection: formats of <= 4 bits leave it kept
    assert layer_options.candidate_formats(asked, (8, 320), exclude_final=True) == ["gguf:Q8_0"]


def _q8_0_reference(w: torch.Tensor) -> torch.Tensor:
    """ggml's quantize_row_q8_0_ref: blocks of 32, d = amax / 127 stored as fp16, q = round(x / d)."""
    blocks = w.reshape(-1, 32)
    d = blocks.abs().amax(1, keepdim=True) / 127
    q = torch.round(blocks / d)
    return (q * d.half().float()).reshape(w.shape)


def test_a_weight_error_is_weighed_by_the_fisher_of_its_block():
    """error = sum over blocks of Fisher x summed squared weight error, the error from
    ggml's Q8_0 rounding written out here. Shown able to fail: Sensitivity.weight_error
    taking the mean over each block instead of the sum -> 32x too small."""
    w = _weights(16, 256, 0)
    fisher = torch.rand(16, 256 // 32, generator=torch.Generator().manual_seed(1)) + 0.5
    module = nn.Linear(256, 16, bias=False)
    options = layer_options.layer_options(module, w, None, Sensitivity(fisher=fisher, block=32), ["gguf:Q8_0"])
    sq = (_q8_0_reference(w) - w).double().square().reshape(16, -1, 32).sum(-1)
    expected = float((sq * fisher.double()).sum())
    print(f"gguf:Q8_0 error {options[1].error:.6e}, reference {expected:.6e}")
    assert options[1].error == pytest.approx(expected, rel=1e-4)


def _int8_dequantized(x: torch.Tensor) -> torch.Tensor:
    codes, scale = int8_rows(x)
    return codes * scale[:, None]


def test_formats_that_quantize_activations_add_their_noise_on_the_calibration_rows():
    """torchao:int8dq also rounds each input row to int8: its option adds gain x the mean
    squared difference that makes on the rows' outputs (written out here in float). A
    weight-only format adds nothing for the same rows. Shown able to fail: layer_options
    without its activation term (`if False and rows is not None ...`) -> int8dq's error
    is 0.0, not 1.477e-05."""
    w = _weights(64, 256, 2)
    rows = torch.randn(48, 256, generator=torch.Generator().manual_seed(3))
    module = nn.Linear(256, 64, bias=False)
    gain = 3.0
    sensitivity = Sensitivity(gain=gain, fisher=torch.zeros(64, 256), block=1)  # weight errors weigh 0
    int8dq, q8_0 = layer_options.layer_options(module, w, rows, sensitivity, ["torchao:int8dq", "gguf:Q8_0"])[1:]
    w_deq = _int8_dequantized(w)
    expected = gain * float((_int8_dequantized(rows) @ w_deq.T - rows @ w_deq.T).double().square().mean())
    print(f"int8dq activation error {int8dq.error:.6e}, reference {expected:.6e}")
    assert int8dq.error == pytest.approx(expected, rel=1e-3)
    assert q8_0.error == 0.0
