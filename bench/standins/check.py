"""Load every stand-in with ComfyUI's real loaders (in-process, CPU) and run it once.

    python -m bench.standins.check [--out DIR] [--only sd15,sdxl,...] [--latent 40]

Each check runs in its own Python process (so its peak RSS is its own) and reports: what
ComfyUI detected (model class, config, text encoders, VAE), parameter counts, and whether a
text encode, one sampling step and a VAE decode/encode give finite output, with times.
A check fails on non-finite output or on ComfyUI warning about missing weights.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Tuple

from . import catalog
from .build import default_out_dir

RESULT_TAG = "QK_CHECK_RESULT "
PROMPT = "a photograph of an astronaut riding a horse"


@dataclass(frozen=True)
class Family:
    """How one family's check loads its stand-ins; every family check then describes what
    ComfyUI detected, encodes the prompt, takes one sampling step and, with a VAE, decodes
    and encodes."""

    description: str
    checkpoint: str = ""  # loaded as CheckpointLoaderSimple does: model, text encoders and VAE inside
    unet: str = ""  # loaded as UNETLoader does
    clips: Tuple[str, ...] = ()  # loaded together as CLIPLoader / DualCLIPLoader / TripleCLIPLoader do
    clip_type: str = ""  # comfy.sd.CLIPType member
    clip_dtype: str = ""  # torch dtype the text encoders are kept in ("": ComfyUI's default)
    vae: str = ""  # loaded as VAELoader does
    bf16_unet: bool = False  # as --bf16-unet
    min_latent: int = 0

    @property
    def needs(self) -> Tuple[str, ...]:
        return tuple(n for n in (self.checkpoint, self.unet, *self.clips, self.vae) if n)


FAMILIES = {
    "sd15": Family("CheckpointLoaderSimple on the SD1.5 checkpoint", checkpoint="sd15"),
    "sdxl": Family("CheckpointLoaderSimple on the SDXL checkpoint (UNet in bf16, as --bf16-unet)",
                   checkpoint="sdxl", bf16_unet=True),
    "sd3_d2": Family("CheckpointLoaderSimple on the SD3 checkpoint (CLIP-L + CLIP-G inside)", checkpoint="sd3_d2"),
    "sd3_tiny": Family("UNETLoader + CLIPLoader(sd3, clip_l) + VAELoader", unet="sd3_tiny", clips=("clip_l",),
                       clip_type="SD3", vae="sd3_vae"),
    "sd3_triple": Family("TripleCLIPLoader(clip_l, clip_g, t5 fp8) + UNETLoader on the SD3 checkpoint",
                         unet="sd3_d2", clips=("clip_l", "clip_g", "t5xxl_fp8"), clip_type="SD3"),
    # CLIPLoader's default would widen the fp8 file to fp16 (about 9.5 GB); keep it fp8.
    # ComfyUI's PixArt position embedding fails below a 40x40 latent (ZeroDivisionError).
    "pixart": Family("UNETLoader + CLIPLoader(pixart, t5 fp8 kept fp8) + VAELoader(SDXL VAE)",
                     unet="pixart_sigma_d2", clips=("t5xxl_fp8",), clip_type="PIXART",
                     clip_dtype="float8_e4m3fn", vae="sdxl_vae", min_latent=40),
    "flux": Family("UNETLoader + DualCLIPLoader(flux: clip_l + t5 fp8) + VAELoader(SD3 VAE, Flux's tensors)",
                   unet="flux_d1", clips=("clip_l", "t5xxl_fp8"), clip_type="FLUX", vae="sd3_vae"),
    "auraflow": Family("CheckpointLoaderSimple on the AuraFlow checkpoint (Pile-T5-XL inside)",
                       checkpoint="auraflow_d2"),
}
TEXT_ENCODERS = ("clip_l", "clip_g")  # the "text_encoders" check: CLIPLoader(clip_l), DualCLIPLoader(sdxl)

# check name -> (stand-ins it needs, description)
CHECKS = {
    **{name: (f.needs, f.description) for name, f in FAMILIES.items()},
    "text_encoders": (TEXT_ENCODERS, "CLIPLoader(clip_l), DualCLIPLoader(sdxl: clip_l + clip_g)"),
}


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def _finite(t) -> bool:
    import torch
    return bool(torch.isfinite(t.float()).all())


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _main_dtype(module) -> str:
    """The dtype holding most of a module's weights (its first parameter may be a float32 scalar)."""
    counts = {}
    for p in module.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return str(max(counts, key=counts.get)).replace("torch.", "") if counts else "-"


class _Run:
    """One check's measurements, reported as JSON."""

    def __init__(self, name):
        self.result = {"check": name, "ok": True, "times": {}, "finite": {}, "notes": []}

    def timed(self, label, fn, *args, **kwargs):
        start = time.monotonic()
        out = fn(*args, **kwargs)
        self.result["times"][label] = round(time.monotonic() - start, 2)
        return out

    def finite(self, label, tensor):
        ok = _finite(tensor)
        self.result["finite"][label] = ok
        self.result["ok"] &= ok
        return ok

    def describe_model(self, patcher, label="model"):
        m = patcher.model
        cfg = m.model_config
        keep = ("image_model", "depth", "hidden_size", "num_heads", "model_channels", "context_dim",
                "transformer_depth", "adm_in_channels", "in_channels", "pos_embed_max_size")
        self.result[label] = {
            "class": type(m).__name__, "config": type(cfg).__name__,
            "unet_config": {k: cfg.unet_config[k] for k in keep if k in cfg.unet_config},
            "dtype": str(m.get_dtype()).replace("torch.", ""),
            "manual_cast": str(m.manual_cast_dtype).replace("torch.", ""),
            "parameters": _params(m.diffusion_model),
            "latent_channels": m.latent_format.latent_channels,
        }

    def describe_clip(self, clip, label="clip"):
        te = clip.cond_stage_model
        parts = {}
        for name in ("clip_l", "clip_g", "t5xxl", "clip_h", "pile_t5xl"):
            sub = getattr(te, name, None)
            if sub is not None:
                parts[name] = {"parameters": _params(sub), "dtype": _main_dtype(sub)}
        if not parts:
            parts[getattr(te, "clip", "?")] = {"parameters": _params(te)}
        self.result[label] = {"class": type(te).__name__, "encoders": parts}

    def describe_vae(self, vae, label="vae"):
        self.result[label] = {"class": type(vae.first_stage_model).__name__, "latent_channels": vae.latent_channels,
                              "dtype": str(vae.vae_dtype).replace("torch.", ""), "parameters": _params(vae.first_stage_model)}


def _encode(run, clip, label="encode"):
    tokens = clip.tokenize(PROMPT)
    cond = run.timed(label, clip.encode_from_tokens_scheduled, tokens)
    c, extra = cond[0]
    run.result[label + "_shape"] = list(c.shape)
    run.finite(label, c)
    if extra.get("pooled_output") is not None:
        run.finite(label + "_pooled", extra["pooled_output"])
    return cond


def _step(run, model, cond, latent_size):
    import torch
    import comfy.sample
    channels = model.model.latent_format.latent_channels
    latent = torch.zeros([1, channels, latent_size, latent_size])
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, 0)
    samples = run.timed("step", comfy.sample.sample, model, noise, 1, 1.0, "euler", "normal", cond, cond, latent,
                        disable_pbar=True, seed=0)
    run.finite("step", samples)
    return samples


def _vae(run, vae, samples):
    images = run.timed("decode", vae.decode, samples)
    run.finite("decode", images)
    latent = run.timed("vae_encode", vae.encode, images[:, :, :, :3])
    run.finite("vae_encode", latent)


def _check_family(run, family: Family, paths: dict, latent_size: int) -> None:
    import torch
    import comfy.sd
    import comfy.utils
    if family.checkpoint:
        opts = {"dtype": torch.bfloat16} if family.bf16_unet else {}
        model, clip, vae, _ = run.timed("load", comfy.sd.load_checkpoint_guess_config, paths[family.checkpoint],
                                        output_vae=True, output_clip=True, model_options=opts)
    else:
        model = run.timed("load", comfy.sd.load_diffusion_model, paths[family.unet])
        opts = {"dtype": getattr(torch, family.clip_dtype)} if family.clip_dtype else {}
        clip = run.timed("load_clip", comfy.sd.load_clip, [paths[n] for n in family.clips],
                         clip_type=getattr(comfy.sd.CLIPType, family.clip_type), model_options=opts)
        vae = None
        if family.vae:
            vae = run.timed("load_vae", lambda p: comfy.sd.VAE(sd=comfy.utils.load_torch_file(p)), paths[family.vae])
    run.describe_model(model)
    run.describe_clip(clip)
    if vae is not None:
        run.describe_vae(vae)
    cond = _encode(run, clip)
    samples = _step(run, model, cond, max(latent_size, family.min_latent))
    if vae is not None:
        _vae(run, vae, samples)


def _check_text_encoders(run, paths: dict) -> None:
    import comfy.sd
    sd = comfy.sd.CLIPType.STABLE_DIFFUSION
    clip_l, clip_g = (paths[n] for n in TEXT_ENCODERS)
    clip = run.timed("load_clip_l", comfy.sd.load_clip, [clip_l], clip_type=sd)
    run.describe_clip(clip, "clip_l")
    _encode(run, clip, "encode_clip_l")
    del clip
    clip = run.timed("load_dual", comfy.sd.load_clip, [clip_l, clip_g], clip_type=sd)
    run.describe_clip(clip, "dual_sdxl")
    _encode(run, clip, "encode_dual")


def _run_check(name: str, paths: dict, latent_size: int) -> dict:
    import torch
    from .comfy_import import import_comfy
    import_comfy()
    run = _Run(name)
    with torch.inference_mode():
        if name in FAMILIES:
            _check_family(run, FAMILIES[name], paths, latent_size)
        elif name == "text_encoders":
            _check_text_encoders(run, paths)
        else:
            raise ValueError(f"unknown check {name!r}; known: {', '.join(CHECKS)}")
    return run.result


def _child(name: str, out_dir: str, latent_size: int) -> int:
    warnings = _Warnings()
    logging.getLogger().addHandler(warnings)
    paths = {s.name: os.path.join(out_dir, s.relpath) for s in catalog.STANDINS}
    missing = [p for n in CHECKS[name][0] for p in [paths[n]] if not os.path.isfile(p)]
    start = time.monotonic()
    if missing:
        result = {"check": name, "ok": False, "error": f"not built: {missing}; run python -m bench.standins.build"}
    else:
        try:
            result = _run_check(name, paths, latent_size)
        except Exception as e:  # reported, not hidden: the parent prints it and fails
            import traceback
            traceback.print_exc()
            result = {"check": name, "ok": False, "error": f"{type(e).__name__}: {e}"}
    # ComfyUI's loaders warn "clip missing: [...]", "unet missing: [...]", "Missing VAE keys [...]".
    missing_weights = [w for w in warnings.records if "missing:" in w.lower() or "missing vae keys" in w.lower()]
    if missing_weights:
        result["ok"] = False
        result["missing_weights"] = [w[:300] for w in missing_weights]
    result["warnings"] = [w[:200] for w in warnings.records if "torchaudio" not in w][:10]
    result["seconds"] = round(time.monotonic() - start, 1)
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 2)
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


def _summary(r: dict) -> str:
    status = "ok  " if r.get("ok") else "FAIL"
    parts = [f"{status} {r['check']:13s} {r.get('seconds', 0):6.1f} s  peak {r.get('peak_rss_gb', 0):5.2f} GB"]
    for label in ("model", "clip", "clip_l", "dual_sdxl", "vae"):
        d = r.get(label)
        if not d:
            continue
        if label == "model":
            parts.append(f"model {d['class']}/{d['config']} {d['parameters'] / 1e6:.1f}M {d['dtype']} {d['unet_config']}")
        elif label == "vae":
            parts.append(f"vae {d['class']} z{d['latent_channels']} {d['parameters'] / 1e6:.1f}M")
        else:
            enc = ", ".join(f"{k} {v['parameters'] / 1e6:.0f}M {v.get('dtype', '')}".strip() for k, v in d["encoders"].items())
            parts.append(f"{label} {d['class']} [{enc}]")
    shapes = [f"{k[:-6]} {v}" for k, v in r.items() if k.endswith("_shape")]
    if shapes:
        parts.append("cond " + "; ".join(shapes))
    if r.get("times"):
        parts.append("times " + " ".join(f"{k}={v}" for k, v in r["times"].items()))
    if r.get("finite"):
        bad = [k for k, v in r["finite"].items() if not v]
        parts.append("finite: " + ("all" if not bad else "NOT " + ",".join(bad)))
    if r.get("warnings"):
        parts.append(f"warnings: {r['warnings']}")
    for k in ("error", "missing_weights"):
        if r.get(k):
            parts.append(f"{k}: {r[k]}")
    return "\n      ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.standins.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="stand-in models tree (default: $QUANTKIT_STANDINS)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(CHECKS)}")
    parser.add_argument("--latent", type=int, default=32, help="latent side (PixArt always uses >= 40)")
    parser.add_argument("--item", default=None, help=argparse.SUPPRESS)  # internal: run one check here
    args = parser.parse_args(argv)
    out_dir = os.path.abspath(args.out or default_out_dir())
    if args.item:
        return _child(args.item, out_dir, args.latent)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    failed = 0
    for name in names:
        proc = subprocess.run([sys.executable, "-m", "bench.standins.check", "--item", name, "--out", out_dir,
                               "--latent", str(args.latent)], cwd=repo, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_TAG)]
        if lines:
            result = json.loads(lines[-1][len(RESULT_TAG):])
        else:
            result = {"check": name, "ok": False, "error": f"exit code {proc.returncode}, no result: "
                                                            + "\n".join(proc.stderr.splitlines()[-15:])}
        print(_summary(result), flush=True)
        if not result.get("ok"):
            failed += 1
            tail = "\n".join(proc.stderr.splitlines()[-20:])
            if tail:
                print("      stderr tail:\n" + tail, flush=True)
    print(f"{len(names) - failed}/{len(names)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
