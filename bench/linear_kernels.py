"""Per-layer kernel benchmark: every 8-bit linear path against bf16 at the real layer shapes
of the benchmarked models (rows include batch 2), with each path's error against a float64
product of the same quantized operands. `--sweep` also times candidate Triton tile sizes
(how the table in backends/kernels/triton_8bit.py was chosen).

    python -m bench.linear_kernels [--sweep] [--out linear.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backends.kernels import fast_linear  # noqa: E402
from bench.measure import time_calls  # noqa: E402

# (model, layer, rows M, in K, out N)
SHAPES = [
    ("SDXL", "attn 64x64 q/k/v/o", 8192, 640, 640),
    ("SDXL", "ff 64x64 in", 8192, 640, 5120),
    ("SDXL", "attn 32x32 q/k/v/o", 2048, 1280, 1280),
    ("SDXL", "ff 32x32 in", 2048, 1280, 10240),
    ("SDXL", "ff 32x32 out", 2048, 5120, 1280),
    ("SDXL", "cross k/v", 154, 2048, 1280),
    ("PixArt", "attn q/k/v/o", 8192, 1152, 1152),
    ("PixArt", "ff in", 8192, 1152, 4608),
    ("PixArt", "ff out", 8192, 4608, 1152),
    ("SD3", "qkv", 8192, 1536, 4608),
    ("SD3", "ff in", 8192, 1536, 6144),
    ("SD3", "ff out", 8192, 6144, 1536),
    ("SD1.5", "attn q/k/v/o", 8192, 320, 320),
    ("SD1.5", "ff in", 8192, 320, 2560),
    ("T5-XXL", "attn q/k/v/o", 128, 4096, 4096),
    ("T5-XXL", "ff in", 128, 4096, 10240),
    ("T5-XXL", "ff out", 128, 10240, 4096),
]
TILE_CANDIDATES = {
    "int8": [(64, 128, 128, 4, 4), (128, 128, 128, 8, 3), (128, 256, 128, 8, 3),
             (128, 128, 64, 4, 4), (64, 64, 256, 4, 3), (32, 128, 256, 4, 4), (16, 128, 256, 4, 4)],
    "half": [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
             (128, 128, 32, 4, 4), (64, 64, 128, 4, 3), (32, 128, 128, 4, 4), (16, 128, 128, 4, 4)],
}


def gpu_ms(fn, reps: int = 30) -> float:
    """Median milliseconds per call (CUDA events), as every bench part measures."""
    return time_calls(fn, "cuda", warmup=5, min_iters=reps, max_iters=reps)["median_s"] * 1000


def graph_ms(fn, reps: int = 20) -> float:
    """GPU time alone: the call captured in a CUDA graph and replayed (no launch cost)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return gpu_ms(graph.replay, reps)


def host_us_per_call(fn, calls: int = 300) -> float:
    """Wall time per call of a tiny layer, back to back: the launch cost on this host."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def operands(m, k, n, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(m * 7 + k * 3 + n)
    x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    w = (torch.randn(n, k, generator=g) * 0.02).to(device)
    bias = (torch.randn(n, generator=g) * 0.02).to(device, torch.bfloat16)
    s8 = (w.abs().amax(1) / 127).clamp(min=1e-12)
    q8 = (w / s8[:, None]).round().clamp(-127, 127).to(torch.int8)
    s_fp8 = (w.abs().amax(1) / 448).clamp(min=1e-12)
    q_fp8 = (w / s_fp8[:, None]).clamp(-448, 448).to(fast_linear.FP8)
    return x, w, bias, (q8, s8), (q_fp8, s_fp8)


def paths(x, w, bias, int8, fp8):
    q8, s8 = int8
    qf, sf = fp8
    w_bf16 = w.to(torch.bfloat16)
    out = {
        "bf16 F.linear": lambda: F.linear(x, w_bf16, bias),
        "int8 weight-only, before (mm, then scale)": lambda: torch.mm(x, q8.t().to(x.dtype)) * s8.to(x.dtype) + bias,
        "int8 W8A8, before (torch ops + _int_mm)": lambda: _old_int8dq(x, q8, s8, bias),
        "int8 -> bf16 (one kernel) + F.linear": lambda: F.linear(x, fast_linear.dequantize_rows(q8, s8, x.dtype), bias),
        "int8 weight-only (triton:w8a16)": lambda: fast_linear._w8a16_eager(x, q8, s8, bias),
        "int8wo as dispatched": lambda: fast_linear.int8_linear(x, q8, s8, bias, dynamic=False),
        "int8 W8A8 (triton:w8a8)": lambda: fast_linear.int8_linear(x, q8, s8, bias, dynamic=True),
    }
    if fast_linear.fp8_matmul_supported(x.device):
        out["fp8 row-wise (scaled_mm:fp8)"] = lambda: fast_linear.fp8_linear(x, qf, sf, bias, dynamic=True)
        out["fp8 -> bf16 (one kernel) + F.linear"] = lambda: fast_linear.fp8_linear(x, qf, sf, bias, dynamic=False)
    return out


def _old_int8dq(x2, q, s, bias):
    xs = (x2.abs().amax(dim=1, keepdim=True).float() / 127.0).clamp(min=1e-12)
    xq = (x2.float() / xs).round().clamp(-127, 127).to(torch.int8)
    acc = torch._int_mm(xq, q.t())
    return (acc.float() * xs * s[None, :]).to(x2.dtype) + bias


def exact_reference(x, q, s, bias):
    return (x.double() @ (q.double() * s.double()[:, None]).t() + bias.double())


def run(sweep: bool):
    rows, sweeps = [], []
    k = fast_linear._kernels()
    for model, layer, m, kk, n in SHAPES:
        x, w, bias, int8, fp8 = operands(m, kk, n)
        ref8 = exact_reference(x, *int8, bias)
        for name, fn in paths(x, w, bias, int8, fp8).items():
            try:
                ms = gpu_ms(fn)
                ms_graph = graph_ms(fn)
                y = fn().double()
            except Exception as exc:
                print(f"{model} {layer} {name}: {type(exc).__name__}: {str(exc)[-300:]}", file=sys.stderr)
                continue
            ref = ref8 if "int8" in name else exact_reference(x, *fp8, bias)
            err = ((y - ref).norm() / ref.norm()).item() if "bf16" not in name else float("nan")
            rows.append({"model": model, "layer": layer, "M": m, "K": kk, "N": n, "path": name,
                         "ms": ms, "gpu_ms": ms_graph, "rel_err_vs_exact": err})
        if sweep:
            q8, s8 = int8
            xq, xs = k.quantize_rows(x, torch.int8, 127.0)
            for kind, a, a_scale in (("int8", xq, xs), ("half", x, None)):
                for tiles in TILE_CANDIDATES[kind]:
                    try:
                        ms = gpu_ms(lambda: k.int8_weight_matmul(a, q8, s8, a_scale, bias, x.dtype, tiles=tiles))
                    except Exception as exc:  # a tile that does not fit in shared memory
                        ms = float("nan")
                        print(f"  {tiles}: {type(exc).__name__}", file=sys.stderr)
                    sweeps.append({"model": model, "layer": layer, "M": m, "K": kk, "N": n,
                                   "kind": kind, "tiles": tiles, "ms": ms})
    tiny = operands(16, 256, 256)
    launch = {}
    for name, fn in paths(*tiny).items():
        try:
            launch[name] = host_us_per_call(fn)
        except Exception as exc:
            print(f"launch {name}: {type(exc).__name__}", file=sys.stderr)
    return rows, sweeps, launch


def print_table(rows, sweeps, launch):
    base = {(r["model"], r["layer"]): r for r in rows if r["path"] == "bf16 F.linear"}
    print("\n| model | layer | M x K x N | path | eager ms | vs bf16 | GPU ms (graph) | vs bf16 | err% vs exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = base[(r["model"], r["layer"])]
        ratio = f"{r['ms'] / b['ms']:.2f}x | {r['gpu_ms']:.4f} | {r['gpu_ms'] / b['gpu_ms']:.2f}x"
        err = "" if r["rel_err_vs_exact"] != r["rel_err_vs_exact"] else f"{100 * r['rel_err_vs_exact']:.3f}"
        print(f"| {r['model']} | {r['layer']} | {r['M']}x{r['K']}x{r['N']} | {r['path']} | "
              f"{r['ms']:.4f} | {ratio} | {err} |")
    if sweeps:
        print("\nbest tiles per shape:")
        for key in sorted({(s["model"], s["layer"], s["kind"]) for s in sweeps}):
            cands = [s for s in sweeps if (s["model"], s["layer"], s["kind"]) == key and s["ms"] == s["ms"]]
            cands.sort(key=lambda s: s["ms"])
            print(key, [(c["tiles"], round(c["ms"], 4)) for c in cands[:3]])
    print("\nhost launch cost, us per call (16x256x256, back to back):")
    for name, us in launch.items():
        print(f"  {name}: {us:.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--out")
    a = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    rows, sweeps, launch = run(a.sweep)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if a.out:
        Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows, "sweeps": sweeps,
                                           "launch_us": launch}, indent=1))
    print(meta)
    print_table(rows, sweeps, launch)


if __name__ == "__main__":
    main()
