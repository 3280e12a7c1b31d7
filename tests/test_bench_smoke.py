"""The benchmark's CI-sized run (CPU, reduced sizes): it runs and writes a usable JSON.
Not a timed test: speed targets live in bench/, not here."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness.locations import REPO_ROOT


@pytest.mark.slow
def test_bench_smoke_run_writes_results(tmp_path):
    """Shown able to fail (reasoned, slow): bench/run.py's smoke run measuring no
    quantized format -> "at least one quantized format was measured"; --profile without
    kernel kinds -> kinds["matmul"] is 0."""
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "run.py"), "--smoke", "--profile", "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    records = data["records"]
    bf16 = [r for r in records if r.get("part") == "denoiser" and r.get("format") == "bf16"]
    assert bf16 and bf16[0]["step"]["median_s"] > 0 and bf16[0]["weight_bytes"] > 0
    quantized = [r for r in records if r.get("part") == "denoiser" and ":" in r.get("format", "")
                 and "step" in r]
    assert quantized, "at least one quantized format was measured"
    assert any(r["weight_bytes"] < bf16[0]["weight_bytes"] for r in quantized)
    assert any(r.get("part") == "pipeline" and r.get("step_s") for r in records)
    assert "bf16" in proc.stdout, "the table is printed"
    kinds = bf16[0]["profile"]["kinds_ms"]  # --profile: time by kernel kind, matmuls found
    assert kinds.get("matmul", 0) > 0 and "busy ms" in proc.stdout


# Kernel names as torch.profiler (Kineto/CUPTI) reports them on NVIDIA GPUs.
PROFILED_NAMES = {
    "Memcpy HtoD (Pageable -> Device)": "host-to-device copies",
    "Memcpy HtoD (Pinned -> Device)": "host-to-device copies",
    "Memcpy DtoD (Device -> Device)": "elementwise/copies",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "matmul",
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution",
    "_group_kernel": "quantize/decode",  # decode groups (backends/kernels/triton_grouped.py)
    "_int8_weight_matmul_kernel": "matmul",
    "pytorch_flash::flash_fwd_kernel": "attention",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>": "elementwise/copies",
}


def test_profile_kinds_sort_kernel_names(monkeypatch):
    """Each profiled kernel lands in its kind; weights streamed in by partial loading are
    their own kind (the low-VRAM rows), apart from copies on the device.
    Shown able to fail: the host-to-device kind removed -> both HtoD names land in
    elementwise/copies; before this test the group decode kernel was counted there too."""
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from bench.step_profile import kind_of
    assert {name: kind_of(name) for name in PROFILED_NAMES} == PROFILED_NAMES
