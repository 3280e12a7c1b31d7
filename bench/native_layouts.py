"""ComfyUI's own quantized tensors (comfy-kitchen layouts, ComfyUI 0.8+) against QuantKit's
formats on one Linear, on the GPU: time per call (median of CUDA-event timings), stored
bytes and error against the float32 product. For the decision, written in the README,
of whether Quantize Model should produce core's layouts on current ComfyUI.
  python bench/native_layouts.py   (COMFYUI_PATH: a ComfyUI with comfy/quant_ops.py)"""
from __future__ import annotations

import importlib
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import comfy_env  # noqa: E402

SHAPES = {"SDXL attn-ff (1280->5120)": (1280, 5120), "DiT mlp (1536->6144)": (1536, 6144)}
TOKENS = 2 * 4096  # batch 2 at 1024x1024 (64x64 latent patches)
QUANTKIT = ["torchao:int8wo", "torchao:fp8dq", "gguf:Q8_0", "quanto:int8"]
CORE = ["TensorCoreFP8Layout", "TensorWiseINT8Layout"]


def timed(fn, reps: int = 30) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel(a, b) -> float:
    return ((a.float() - b).norm() / b.norm()).item()


def main() -> None:
    comfy_env.start(cpu=False)
    from comfy.quant_ops import QuantizedTensor
    get_format = importlib.import_module(f"{comfy_env.PACK_NAME}.backends.engine.registry").get_format
    dev = torch.device("cuda")
    rows = []
    for label, (k, n) in SHAPES.items():
        g = torch.Generator(device=dev).manual_seed(0)
        w = torch.randn(n, k, device=dev, generator=g) * 0.02
        x = torch.randn(TOKENS, k, device=dev, generator=g).to(torch.bfloat16)
        ref = F.linear(x.float(), w)
        wb = w.to(torch.bfloat16)
        base = timed(lambda: F.linear(x, wb))
        rows.append((label, "bf16", base, 1.0, wb.nbytes, rel(F.linear(x, wb), ref)))
        for layout in CORE:
            try:
                qt = QuantizedTensor.from_float(wb, layout)
                out = F.linear(x, qt)
                t = timed(lambda: F.linear(x, qt))
                size = qt._qdata.nbytes
                rows.append((label, f"core {layout}", t, t / base, size, rel(out, ref)))
            except Exception as e:  # noqa: BLE001 (a layout this build cannot run: say so)
                rows.append((label, f"core {layout}: {type(e).__name__}: {e}"[:90], 0, 0, 0, 0))
        for fmt in QUANTKIT:
            adapter, spec = get_format(fmt)
            parts = adapter.quantize(wb, spec)
            fn = lambda: adapter.linear(x, parts, spec, wb.shape, None)  # noqa: E731
            out = fn()
            t = timed(fn)
            size = sum(p.nbytes for p in parts.values() if isinstance(p, torch.Tensor))
            rows.append((label, f"quantkit {fmt}", t, t / base, size, rel(out, ref)))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {TOKENS} tokens")
    print("| layer | format | ms | x bf16 | MiB | rel. error vs fp32 |")
    print("|---|---|---|---|---|---|")
    for label, fmt, t, ratio, size, err in rows:
        print(f"| {label} | {fmt} | {t:.3f} | {ratio:.2f}x | {size / 2**20:.1f} | {100 * err:.2f} % |")


if __name__ == "__main__":
    main()
