"""Text-encoder part: CLIP-L, CLIP-G and T5-XXL built through ComfyUI's text-encoder loader,
quantized with the pack's Quantize Text Encoder node; one prompt encoded as ComfyUI does
(CLIP.encode_from_tokens), inside torch.inference_mode."""
from __future__ import annotations

import logging
import time

import torch

from . import formats as F
from . import models
from .denoisers import _error_text, timing_options
from .measure import free, module_bytes, peak_during, rel_error, sync, time_calls
from .weights import fill_state_dict

log = logging.getLogger("quantkit.bench")
REFERENCE = "fp16"  # ComfyUI's text-encoder dtype on a GPU


def _encode(clip, tokens):
    return clip.encode_from_tokens(tokens)


def make_clip(env, spec, sd, fmt, device):
    if fmt in F.BASELINES:
        return models.build_clip(env, spec, sd, F.BASELINES[fmt], device), None
    source_dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    source = models.build_clip(env, spec, sd, source_dtype, device)
    node = env.pack.nodes.NODE_CLASS_MAPPINGS["QuantKitQuantizeTextEncoder"]()
    sync(device)
    start = time.perf_counter()
    clip = node.quantize(source, fmt, spec.key, "auto")["result"][0]
    sync(device)
    seconds = time.perf_counter() - start
    del source
    return clip, seconds


def run(env, results, spec, fmts, device, dists, deadline: float):
    registry = env.pack.registry
    meta = models.encoder_meta_state_dict(spec)
    n_params = sum(t.numel() for t in meta.values())
    fmts = [REFERENCE] + [f for f in fmts if f != REFERENCE]
    for dist in dists:
        if time.time() > deadline:
            break
        # fp32 values: ComfyUI's T5 loader never stores wider than the file's dtype
        sd = fill_state_dict(meta, dist, device)
        with torch.inference_mode():
            refs = {}
            try:
                clip = models.build_clip(env, spec, sd, torch.float32, device)
                tokens = clip.tokenize(models.prompt(spec.prompt_words))
                refs["fp32"] = _encode(clip, tokens).float()
                del clip
            except Exception as exc:
                log.warning("fp32 reference of %s failed: %s", spec.key, _error_text(exc))
            free(device)
            for fmt in fmts:
                rec = results.record("encoder", spec.key, fmt)
                rec.update(label=spec.label, params=n_params, bits=F.bits(fmt, registry))
                problem = F.problem(fmt, registry, device)
                if problem:
                    rec["error"] = problem
                    continue
                if time.time() > deadline:
                    rec.setdefault("skipped", f"time budget ({dist} weights)")
                    continue
                try:
                    clip, quant_s = make_clip(env, spec, sd, fmt, device)
                    free(device)
                    tokens = clip.tokenize(models.prompt(spec.prompt_words))
                    clip.load_model()
                    out, extra = peak_during(lambda: _encode(clip, tokens), device)
                    out = out.float()
                    errs = rec.setdefault("rel_err", {}).setdefault(dist, {})
                    for ref_name, ref in refs.items():
                        errs[ref_name] = rel_error(out, ref)
                    if fmt == REFERENCE:
                        refs[REFERENCE] = out
                    if quant_s is not None:
                        rec.setdefault("quant_s", {})[dist] = quant_s
                    if dist == dists[0]:
                        weights = module_bytes(clip.cond_stage_model)
                        rec["weight_bytes"] = weights
                        rec["step_peak_bytes"] = None if extra is None else weights + extra
                        kernels = env.pack.fast_linear.KERNELS
                        kernels.clear()
                        rec["step"] = time_calls(lambda: _encode(clip, tokens), device, **timing_options(device))
                        rec["kernels"] = dict(kernels)  # which linear paths the encoder's layers took
                        rec["tokens"] = int(out.shape[1])
                    del clip
                except Exception as exc:
                    rec.setdefault("errors", {})[dist] = _error_text(exc)
                    log.warning("%s %s (%s): %s", spec.key, fmt, dist, rec["errors"][dist])
                finally:
                    env.mm.unload_all_models()
                    free(device)
                    results.save()
        del sd
        free(device)
