"""QuantReport (engine/report.py): the bookkeeping Quantize Model and Load GGUF share, against
the source's bytes or against the same values at 16 bits. Pure Python and torch, no
ComfyUI (the reports the nodes build are tested in test_nodes/test_quantize_model.py and
test_nodes/test_load_gguf.py)."""
from __future__ import annotations

import pytest
import torch

from conftest import pack_module

report = pack_module("backends.engine.report")


def _filled(versus: str, source: bool):
    r = report.QuantReport("toy", "gguf:Q4_K", "generic", "cpu", versus=versus)
    src = (lambda n: n) if source else (lambda n: None)
    r.record("a", (32, 64), report.QUANTIZED, "gguf:Q4_K", "", values=2080, stored_bytes=1200,
             source_bytes=src(4160))
    r.record("b", (8, 8), report.KEPT, None, "too small", values=72, stored_bytes=288,
             source_bytes=src(288))
    r.record("c", (32, 40), report.FALLBACK, "gguf:Q4_1", "not a multiple of 256", values=1280,
             stored_bytes=800, source_bytes=src(2560))
    r.record_other([torch.zeros(10, dtype=torch.float32)])  # a norm: 40 bytes
    return r


def test_sizes_against_the_source_and_at_16_bits():
    """Shown able to fail: reference_bytes returning `2 * values` whatever `versus` says ->
    bytes_before 6884 != 7048 (the fp32 layers and norm counted at 16 bits)."""
    r = _filled(report.SOURCE, source=True)
    assert r.bytes_before == 4160 + 288 + 2560 + 40
    assert r.bytes_after == 1200 + 288 + 800 + 40
    assert r.bytes_by_format() == {"gguf:Q4_K": 1200, "gguf:Q4_1": 800, "unquantized": 288 + 40}
    assert r.counts_text() == "1 layers quantized, 1 fallback, 1 kept"
    assert r.kept_reasons() == {"too small": 1, "not a multiple of 256": 1}
    assert r.sizes_text(str) == "7048 -> 2328"

    r16 = _filled(report.AT_16_BITS, source=False)
    assert r16.bytes_before == 2 * (2080 + 72 + 1280 + 10)
    assert r16.bytes_after == r.bytes_after
    assert r16.sizes_text(str) == f"{2 * 3442} at 16 bits -> 2328"
    with pytest.raises(ValueError, match="toy: a report against the source needs"):
        _filled(report.SOURCE, source=False)
