"""Denoiser part: every format on every stand-in diffusion model, one sampling step at
batch 2 (cond + uncond) through BaseModel.apply_model, inside torch.inference_mode."""
from __future__ import annotations

import logging
import tempfile
import time
import traceback
from pathlib import Path

import torch

from . import formats as F
from . import gguf_io, models, native_models, step_profile
from .measure import free, peak_during, rel_error, sync, time_calls
from .weights import fill_state_dict

log = logging.getLogger("quantkit.bench")
BATCH = 2


CPU_FULL_TIMING = False  # set by run.py --cpu-full: real timings on a CPU
PROFILE = False  # set by run.py --profile: where each timed format's step time goes


def timing_options(device) -> dict:
    if torch.device(device).type == "cuda":
        return {}
    if CPU_FULL_TIMING:
        return {"warmup": 1, "min_iters": 2, "max_iters": 3, "max_seconds": 60.0}
    return {"warmup": 0, "min_iters": 1, "max_iters": 1}  # CPU smoke: proves it runs, not a timing


def compile_model(env, patcher):
    """The patcher as ComfyUI's TorchCompileModel node (inductor) returns it."""
    from comfy_extras.nodes_torch_compile import TorchCompileModel
    import torch._dynamo
    torch._dynamo.reset()  # each format compiles from scratch, within the recompile limit
    out = TorchCompileModel.execute(model=patcher, backend="inductor")
    return out.result[0] if hasattr(out, "result") else out[0]


def make_model(env, spec, sd, fmt, device) -> tuple:
    """(patcher, seconds to build or quantize). Quantized formats go through the pack's
    Quantize Model node on a bf16 source model, as a workflow does."""
    if fmt in F.BASELINES or fmt in F.LOADED:
        patcher = native_models.build(env, spec, sd, fmt)
        if patcher is None:
            patcher = models.build_diffusion(env, spec, sd, F.BASELINES[fmt], device)
        sync(device)
        return patcher, None
    source = models.build_diffusion(env, spec, sd, models.compute_dtype(device), device)
    node = env.pack.nodes.NODE_CLASS_MAPPINGS["QuantKitQuantizeModel"]()
    sync(device)
    start = time.perf_counter()
    patcher = node.quantize(source, fmt, spec.recipe, "", "auto")["result"][0]
    sync(device)
    seconds = time.perf_counter() - start
    del source  # its quantized-away weights are freed; kept layers are shared
    return patcher, seconds


def _error_text(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {str(exc).strip()[:400]}{where}"


def measure_format(env, spec, sd, fmt, inputs, device, rec, dist, refs, timing: bool, tmpdir,
                   compiled: bool = False):
    env.pack.decode_groups.ENABLED = not fmt.endswith(F.PER_LAYER)
    try:
        return _measure(env, spec, sd, F.base(fmt), inputs, device, rec, dist, refs, timing,
                        tmpdir, compiled, roundtrip=not fmt.endswith(F.PER_LAYER))
    finally:
        env.pack.decode_groups.ENABLED = True


def _measure(env, spec, sd, fmt, inputs, device, rec, dist, refs, timing: bool, tmpdir,
             compiled: bool, roundtrip: bool):
    patcher, quant_s = make_model(env, spec, sd, fmt, device)
    if compiled:
        patcher = compile_model(env, patcher)
    free(device)
    env.mm.load_models_gpu([patcher])
    weights = env.pack.storage_census.census_tree(patcher.model.diffusion_model).stored_bytes  # core's tensors too
    denoised, extra = peak_during(lambda: models.step(patcher, inputs), device)
    out = models.raw_output(denoised, inputs)
    errs = rec.setdefault("rel_err", {}).setdefault(dist, {})
    if "fp32" in refs:
        errs["fp32"] = rel_error(out, refs["fp32"])
    if F.REFERENCE in refs:
        errs[F.REFERENCE] = rel_error(out, refs[F.REFERENCE])
    if quant_s is not None:
        rec.setdefault("quant_s", {})[dist] = quant_s
    if timing:
        rec["weight_bytes"] = weights
        rec["step_peak_bytes"] = None if extra is None else weights + extra
        kernels = env.pack.fast_linear.KERNELS
        kernels.clear()
        rec["step"] = time_calls(lambda: models.step(patcher, inputs), device, **timing_options(device))
        rec["kernels"] = dict(kernels)
        if PROFILE:
            rec["profile"] = step_profile.where_time_goes(lambda: models.step(patcher, inputs), device)
        if roundtrip and fmt in F.GGUF_LOAD and not compiled:
            rec["gguf"] = _gguf_roundtrip(env, spec, patcher, inputs, out, device, tmpdir)
    env.mm.unload_all_models()
    del patcher
    return out


def _gguf_roundtrip(env, spec, patcher, inputs, out, device, tmpdir) -> dict:
    path = Path(tmpdir) / f"{spec.key}.gguf"
    try:
        size = gguf_io.save_gguf(patcher.model.diffusion_model, path, spec.key, env.pack)
        loaded = gguf_io.time_load(env, path, device)
        again = models.raw_output(models.step(loaded["patcher"], inputs), inputs)
        step = time_calls(lambda: models.step(loaded["patcher"], inputs), device, **timing_options(device))
        return {"file_bytes": size, "load_s": loaded["load_s"], "to_device_s": loaded["to_device_s"],
                "err_vs_in_memory": rel_error(again, out), "step": step}
    except Exception as exc:
        return {"error": _error_text(exc)}
    finally:
        path.unlink(missing_ok=True)


def run(env, results, spec, fmts, device, dists, deadline: float, compiled: bool = False):
    registry = env.pack.registry
    meta = models.meta_state_dict(spec)
    inputs = models.denoiser_inputs(spec, BATCH, device)
    n_params = sum(t.numel() for t in meta.values())
    with tempfile.TemporaryDirectory(prefix="qk-bench-") as tmpdir:
        for i, dist in enumerate(dists):
            # the first draw also times every format: it gets most of the model's time
            left = deadline - time.time()
            dist_deadline = deadline if i == len(dists) - 1 else time.time() + 0.65 * left
            if left <= 0:
                break
            sd = fill_state_dict(meta, dist, device)
            refs = {}
            with torch.inference_mode():
                try:
                    refs["fp32"] = _fp32_reference(env, spec, sd, inputs, device)
                except Exception as exc:
                    log.warning("fp32 reference of %s failed: %s", spec.key, _error_text(exc))
                for fmt in fmts:
                    rec = results.record("denoiser", spec.key, f"{fmt} compiled" if compiled else fmt)
                    rec.update(label=spec.label, params=n_params, bits=F.bits(fmt, registry),
                               latent=spec.latent, batch=BATCH)
                    problem = F.problem(fmt, registry, device)
                    if problem:
                        rec["error"] = problem
                        continue
                    if time.time() > dist_deadline:
                        rec.setdefault("skipped", f"time budget ({dist} weights)")
                        continue
                    try:
                        out = measure_format(env, spec, sd, fmt, inputs, device, rec, dist, refs,
                                             timing=(dist == dists[0]), tmpdir=tmpdir,
                                             compiled=compiled)
                        if fmt == F.REFERENCE:
                            refs[F.REFERENCE] = out
                    except Exception as exc:
                        rec.setdefault("errors", {})[dist] = _error_text(exc)
                        log.warning("%s %s (%s): %s", spec.key, fmt, dist, rec["errors"][dist])
                    finally:
                        env.mm.unload_all_models()
                        free(device)
                        results.save()
            del sd
            free(device)


def _fp32_reference(env, spec, sd, inputs, device):
    patcher = models.build_diffusion(env, spec, sd, torch.float32, device)
    try:
        return models.raw_output(models.step(patcher, inputs), inputs)
    finally:
        del patcher
        free(device)
