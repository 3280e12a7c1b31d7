"""How long QuantKit's GGUF quantizers take on one 4096 x 4096 weight, in CPU seconds on
one thread (CPU time is not inflated by other jobs on a shared machine).

  python -m bench.gguf_quantize_speed [--target-s 2.0]

Target: under 2 CPU s per type, so a 2.6 GB SDXL UNet quantizes in minutes, not hours.
"""
from __future__ import annotations

import argparse
import time

import torch

from backends.gguf import quantize as gguf_quantize
def measure(name: str, weight: torch.Tensor) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.process_time()
        gguf_quantize.quantize(weight, name)
        return time.process_time() - start
    finally:
        torch.set_num_threads(threads)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-s", type=float, default=2.0)
    args = ap.parse_args()
    weight = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(5)) * 0.02
    rows = [(name, measure(name, weight)) for name in gguf_quantize.QUANTIZERS]
    print(f"{'type':7} CPU s (1 thread, 4096x4096)   target < {args.target_s:g}")
    for name, seconds in rows:
        print(f"{name:7} {seconds:6.3f}  {'ok' if seconds < args.target_s else 'SLOW'}")
    return 0 if all(s < args.target_s for _, s in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
