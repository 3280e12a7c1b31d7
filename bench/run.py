"""QuantKit benchmark: memory, speed and fidelity of every format on stand-in models of the
real architectures, next to ComfyUI's own bf16/fp16/fp8 storage.

  python bench/run.py --smoke                      CPU, reduced sizes, a few formats (< 3 min)
  python bench/run.py --gpu-full --parts denoisers --models sdxl,pixart --formats all
  python bench/run.py --gpu-full --parts encoders,pipelines
  python bench/run.py --gpu-full --parts lowvram

Each call writes one JSON (--out); `python bench/report.py A.json B.json ...` merges them
into bench/RESULTS.md, a chart and the README's performance section.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import comfy_env, formats as F, results as R, table  # noqa: E402

PARTS = ("denoisers", "encoders", "pipelines", "lowvram")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="CPU, reduced sizes, a few formats")
    mode.add_argument("--gpu-full", action="store_true", help="CUDA, real sizes")
    mode.add_argument("--cpu-full", action="store_true",
                      help="CPU, real sizes (denoisers: SD1.5 by default; fp32 is the reference)")
    ap.add_argument("--parts", default=None, help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--models", default=None, help="denoisers: sd15,sdxl,sd3,pixart; encoders: "
                    "clip_l,clip_g,t5xxl; pipelines: pixart,sd3 (default: all of the part)")
    ap.add_argument("--formats", default=None, help="'all', 'smoke', 'gguf:*' or a comma list")
    ap.add_argument("--dists", default="normal,heavy", help="weight draws: normal,heavy")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new measurements after this many seconds")
    ap.add_argument("--out", type=Path, default=None, help="JSON result path")
    ap.add_argument("--steps", type=int, default=None, help="pipeline sampling steps")
    ap.add_argument("--compile", action="store_true",
                    help="denoisers: also through ComfyUI's TorchCompileModel (rows '<format> compiled')")
    ap.add_argument("--profile", action="store_true",
                    help="denoisers, lowvram: also profile each timed format (kernel time by kind)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    import torch
    full = bool(args.gpu_full)
    if full and not torch.cuda.is_available():
        raise SystemExit("--gpu-full needs a CUDA device; use --smoke on a CPU.")
    device = torch.device("cuda" if full or (not args.smoke and not args.cpu_full
                                             and torch.cuda.is_available()) else "cpu")
    full = full or args.cpu_full or (device.type == "cuda" and not args.smoke)
    parts = (args.parts or ("denoisers,encoders,pipelines" if args.smoke else ",".join(PARTS))).split(",")
    for p in parts:
        if p not in PARTS:
            raise SystemExit(f"unknown part {p!r}; parts: {', '.join(PARTS)}")
    budget = args.budget_s or (120 if args.smoke else 3600)
    deadline = time.time() + budget
    out = args.out or DEFAULT_OUT / f"bench-{'full' if full else 'smoke'}-{time.strftime('%Y%m%d-%H%M%S')}.json"

    if "lowvram" in parts and len(parts) > 1:
        # ComfyUI reads its VRAM limit once per process: the low-VRAM part runs alone.
        parts.remove("lowvram")
        _spawn_lowvram(args, out)

    if not parts:
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    extra = ()
    if parts == ["lowvram"] and device.type == "cuda":
        from bench import lowvram
        extra = lowvram.comfy_args()
    env = comfy_env.start(cpu=device.type == "cpu", extra_args=extra)
    command = "python bench/run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    meta = R.base_meta(command, comfy_env.device_name(), comfy_env.versions(env), parts, full)
    result = R.ResultFile(out, meta)
    fmts = F.resolve(args.formats or ("smoke" if not full else "all"), env.pack.registry,
                     reference="fp32" if args.cpu_full else F.REFERENCE) \
        if any(p in parts for p in ("denoisers", "encoders")) else []
    dists = [d for d in args.dists.split(",") if d]

    for n, part in enumerate(parts):
        # each part gets an equal share of what is left (the low-VRAM part ran apart)
        part_deadline = time.time() + (deadline - time.time()) / (len(parts) - n)
        if part == "denoisers":
            from bench import denoisers, models
            specs = models.denoisers(full)
            keys = _pick(args.models, specs, default=("sd3",) if not full else
                         ("sd15",) if args.cpu_full else tuple(specs))
            denoisers.CPU_FULL_TIMING = args.cpu_full
            denoisers.PROFILE = args.profile
            for i, key in enumerate(keys):
                # share what is left fairly between the models still to run
                share = (part_deadline - time.time()) / (len(keys) - i)
                denoisers.run(env, result, specs[key], fmts, device, dists, time.time() + share,
                              compiled=args.compile)
        elif part == "encoders":
            from bench import encoders, models
            keys = _pick(args.models, models.ENCODERS, default=("clip_l",) if not full else tuple(models.ENCODERS))
            efmts, edists = (fmts, dists) if full or args.formats else (["fp16", "quanto:int8"], dists[:1])
            for i, key in enumerate(keys):
                share = (part_deadline - time.time()) / (len(keys) - i)
                encoders.run(env, result, models.ENCODERS[key], efmts, device, edists, time.time() + share)
        elif part == "pipelines":
            from bench import pipelines
            keys = _pick(args.models, pipelines.PIPELINES, default=("sd3",) if not full else tuple(pipelines.PIPELINES))
            pipelines.run(env, result, keys, full, device, args.steps, part_deadline,
                          variants=args.formats.split(",") if args.formats else None)
        elif part == "lowvram":
            from bench import lowvram
            lowvram.PROFILE = args.profile
            lowvram.run(env, result, device, args.formats, args.steps, part_deadline)
        result.save()

    print(f"\nresults: {out}")
    print(table.render(R.load_merged([out])))
    return 0


def _pick(requested, known, default):
    if not requested:
        return list(default)
    keys = [k for k in requested.split(",") if k in known]
    return keys  # names of other parts' models are ignored here


def _spawn_lowvram(args, out: Path) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--parts", "lowvram",
           "--out", str(out.with_name(out.stem + "-lowvram.json"))]
    if args.gpu_full:
        cmd.append("--gpu-full")
    if args.formats:
        cmd += ["--formats", args.formats]
    if args.budget_s:
        cmd += ["--budget-s", str(args.budget_s)]
    if args.profile:
        cmd.append("--profile")
    subprocess.run(cmd, check=False)


if __name__ == "__main__":
    sys.exit(main())
