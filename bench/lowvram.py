"""Low-VRAM part: ComfyUI told the card has 4 GiB (--reserve-vram = total - 4), SDXL at
1024² sampled with cfg through comfy.sample.sample: the 16-bit model is loaded partially
and streamed; quantized formats that fit are loaded whole. Runs in its own process."""
from __future__ import annotations

import logging
import time

import torch

from . import formats as F
from . import models
from .denoisers import _error_text
from .measure import free, sync
from .pipelines import STEP_TIMES, BenchStepTimer, _step_seconds
from .weights import fill_state_dict

log = logging.getLogger("quantkit.bench")
CARD_GIB = 4.0
VARIANTS = ("default", "bf16", "comfy:fp8_e4m3fn", "torchao:int8wo", "gguf:Q8_0", "gguf:Q4_K", "bnb:nf4")
STEPS = 8
PROFILE = False  # set by run.py --profile: where one sampling step's time goes
PROFILED_STEPS = 2


def comfy_args() -> tuple:
    total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    return ("--reserve-vram", f"{total - CARD_GIB:.2f}")


def _conds(spec, device):
    g = torch.Generator().manual_seed(0)
    cond = lambda: [[torch.randn(1, spec.tokens, spec.context_dim, generator=g),  # noqa: E731
                     {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    return cond(), cond()


def _model(env, spec, variant, device):
    dtype = {"default": None, "bf16": torch.bfloat16, "comfy:fp8_e4m3fn": torch.float8_e4m3fn}
    sd = fill_state_dict(models.meta_state_dict(spec), "normal", device, dtype=torch.bfloat16)
    options = {} if variant not in dtype or dtype[variant] is None else {"dtype": dtype[variant]}
    patcher = env.sd.load_diffusion_model_state_dict(sd, model_options=options)
    del sd
    free(device)
    quant_s = None
    if variant not in dtype:
        node = env.pack.nodes.NODE_CLASS_MAPPINGS["QuantKitQuantizeModel"]()
        start = time.perf_counter()
        patcher = node.quantize(patcher, variant, spec.recipe, "", "auto")["result"][0]
        quant_s = time.perf_counter() - start
        free(device)
    return patcher, quant_s


def _profile_steps(patcher, spec, positive, negative, latent, noise, device) -> dict:
    """where_time_goes over a short sampling run, in milliseconds per step."""
    import comfy.sample
    from .step_profile import where_time_goes

    def sample():
        with torch.inference_mode():
            comfy.sample.sample(patcher, noise, PROFILED_STEPS, 6.0, "euler", "normal",
                                positive, negative, latent)
    per_run = where_time_goes(sample, device)
    return {"wall_ms": per_run["wall_ms"] / PROFILED_STEPS, "busy_ms": per_run["busy_ms"] / PROFILED_STEPS,
            "kinds_ms": {k: v / PROFILED_STEPS for k, v in per_run["kinds_ms"].items()}}


def run(env, results, device, formats_arg, steps, deadline: float):
    import comfy.sample
    if torch.device(device).type != "cuda":
        rec = results.record("lowvram", "sdxl", "default")
        rec["skipped"] = "needs a CUDA device"
        return
    spec = models.denoisers(True)["sdxl"]
    variants = [v for v in (formats_arg.split(",") if formats_arg else VARIANTS)]
    steps = steps or STEPS
    for variant in variants:
        rec = results.record("lowvram", "sdxl", variant)
        rec["label"] = f"SDXL UNet 1024², card limited to {CARD_GIB:g} GiB"
        problem = F.problem(variant, env.pack.registry, device) if variant != "default" else None
        if problem:
            rec["error"] = problem
            continue
        if time.time() > deadline:
            rec["skipped"] = "time budget"
            continue
        try:
            env.mm.unload_all_models()
            free(device)
            patcher, quant_s = _model(env, spec, variant, device)
            label = f"lowvram/{variant}"
            timed = BenchStepTimer().wrap(patcher, label)[0]
            positive, negative = _conds(spec, device)
            latent = torch.zeros(1, 4, spec.latent, spec.latent)
            noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with torch.inference_mode():
                comfy.sample.sample(timed, noise, steps, 6.0, "euler", "normal", positive, negative, latent)
            sync(device)
            step_s, batch = _step_seconds(label)
            rec.update(step_s=step_s, total_s=time.perf_counter() - start, batch_per_call=batch, steps=steps,
                       peak_bytes=torch.cuda.max_memory_allocated(), quant_s=quant_s,
                       model_bytes=timed.model_size(), loaded_bytes=timed.loaded_size(),
                       note=f"{(timed.model_size() - timed.loaded_size()) / 2**20:.0f} MiB offloaded, batch {batch}")
            if PROFILE:
                rec["profile"] = _profile_steps(timed, spec, positive, negative, latent, noise, device)
            del patcher, timed
        except Exception as exc:
            rec.setdefault("errors", {})["normal"] = _error_text(exc)
            log.warning("lowvram %s: %s", variant, rec["errors"]["normal"])
        finally:
            STEP_TIMES.clear()
            env.mm.unload_all_models()
            free(device)
            results.save()
