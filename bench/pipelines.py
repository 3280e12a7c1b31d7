"""Whole pipelines through ComfyUI's own executor (execution.PromptExecutor, which runs
every node inside torch.inference_mode): text encoding, sampling with cfg, VAE decoding.

The stand-in models enter the graph through three small loader nodes registered here
(random weights generated on the device, then handed to ComfyUI's own loaders:
load_diffusion_model_state_dict, load_text_encoder_state_dicts, VAE), so everything after
them is stock ComfyUI plus the pack's own nodes. Phases run as successive executions of
one graph (the executor's cache keeps what ran before), each with its own memory peak.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import torch

from . import models
from .denoisers import _error_text
from .measure import free, sync
from .weights import fill_state_dict

log = logging.getLogger("quantkit.bench")


@dataclass(frozen=True)
class Pipeline:
    key: str
    denoiser: str  # key in models.denoisers()
    clip_type: str  # comfy.sd.CLIPType member
    encoders: tuple  # components functions, in loader order
    vae: str  # components function
    size: int  # image width/height
    cfg: float
    sampler: str
    scheduler: str


PIPELINES = {
    "pixart": Pipeline("pixart", "pixart", "PIXART", ("t5xxl",), "vae_kl4", 1024, 4.5, "euler", "normal"),
    "sd3": Pipeline("sd3", "sd3", "SD3", ("clip_l", "clip_g", "t5xxl"), "vae_sd3", 1024, 4.5, "euler",
                    "sgm_uniform"),
}
SMOKE_PIPELINE = Pipeline("sd3", "sd3", "SD3", ("clip_l",), "vae_sd3", 128, 4.5, "euler", "sgm_uniform")
# variant -> (diffusion weight dtype, text-encoder dtype, QuantKit format or None)
VARIANTS = {
    "default": ("default", "default", None),
    "comfy:fp8_e4m3fn": ("float8_e4m3fn", "float8_e4m3fn", None),
    "torchao:int8wo": ("default", "default", "torchao:int8wo"),
    "torchao:int8dq": ("default", "default", "torchao:int8dq"),
    "torchao:fp8dq": ("default", "default", "torchao:fp8dq"),
    "gguf:Q8_0": ("default", "default", "gguf:Q8_0"),
}
SMOKE_VARIANTS = ("default", "torchao:int8wo")
POSITIVE_WORDS = 40
STEP_TIMES: dict = {}  # label -> list of (start event or time, end, batch)
_CONTEXT: dict = {}  # what the loader nodes build from: set by run()


def _dtype_option(name: str) -> dict:
    return {} if name == "default" else {"dtype": getattr(torch, name)}


class BenchDiffusionModel:
    CATEGORY = "QuantKit/bench"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"weight_dtype": ("STRING", {"default": "default"})}}

    def load(self, weight_dtype):
        ctx = _CONTEXT
        sd = fill_state_dict(models.meta_state_dict(ctx["denoiser"]), "normal", ctx["device"])
        patcher = ctx["env"].sd.load_diffusion_model_state_dict(sd, model_options=_dtype_option(weight_dtype))
        del sd
        free(ctx["device"])
        return (patcher,)


class BenchTextEncoders:
    CATEGORY = "QuantKit/bench"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"dtype": ("STRING", {"default": "default"})}}

    def load(self, dtype):
        from .standins import components
        ctx = _CONTEXT
        pipe = ctx["pipeline"]
        sds = [fill_state_dict(getattr(components, name)(torch.float16), "normal", ctx["device"],
                               dtype=torch.float16) for name in pipe.encoders]
        env = ctx["env"]
        clip = env.sd.load_text_encoder_state_dicts(sds, clip_type=getattr(env.sd.CLIPType, pipe.clip_type),
                                                    model_options=_dtype_option(dtype))
        del sds
        free(ctx["device"])
        return (clip,)


class BenchVAE:
    CATEGORY = "QuantKit/bench"
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        from .standins import components
        ctx = _CONTEXT
        sd = fill_state_dict(getattr(components, ctx["pipeline"].vae)(), "normal", ctx["device"])
        vae = ctx["env"].sd.VAE(sd=sd)
        del sd
        free(ctx["device"])
        return (vae,)


class BenchStepTimer:
    """Passes the model on with a wrapper that times every denoiser call."""
    CATEGORY = "QuantKit/bench"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "wrap"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "label": ("STRING", {"default": ""})}}

    def wrap(self, model, label):
        m = model.clone()
        calls = STEP_TIMES.setdefault(label, [])

        def wrapper(apply_model, args):
            x = args["input"]
            if x.is_cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                out = apply_model(x, args["timestep"], **args["c"])
                b.record()
            else:
                a = time.perf_counter()
                out = apply_model(x, args["timestep"], **args["c"])
                b = time.perf_counter()
            calls.append((a, b, int(x.shape[0])))
            return out

        m.set_model_unet_function_wrapper(wrapper)
        return (m,)


class BenchSink:
    """An output node: makes the executor run what feeds it."""
    CATEGORY = "QuantKit/bench"
    RETURN_TYPES = ()
    FUNCTION = "take"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("*",)}, "optional": {"b": ("*",), "c": ("*",)}}

    def take(self, a, b=None, c=None):
        return {}


BENCH_NODES = {"QKBenchDiffusionModel": BenchDiffusionModel, "QKBenchTextEncoders": BenchTextEncoders,
               "QKBenchVAE": BenchVAE, "QKBenchStepTimer": BenchStepTimer, "QKBenchSink": BenchSink}


def graph(pipe: Pipeline, variant: str, steps: int, label: str) -> tuple:
    """(prompt, {phase: output node ids})."""
    model_dtype, te_dtype, fmt = VARIANTS[variant]
    words = models.prompt(POSITIVE_WORDS).split()
    positive, negative = " ".join(words), " ".join(reversed(words))  # same tokens, same length
    p = {
        "m": {"class_type": "QKBenchDiffusionModel", "inputs": {"weight_dtype": model_dtype}},
        "c": {"class_type": "QKBenchTextEncoders", "inputs": {"dtype": te_dtype}},
        "v": {"class_type": "QKBenchVAE", "inputs": {}},
    }
    model, clip = ["m", 0], ["c", 0]
    if fmt:
        p["qm"] = {"class_type": "QuantKitQuantizeModel", "inputs": {
            "model": model, "format": fmt, "recipe": pipe.denoiser, "exclude": "", "quantize_on": "auto"}}
        p["qc"] = {"class_type": "QuantKitQuantizeTextEncoder", "inputs": {
            "clip": clip, "format": fmt, "encoders": "auto", "quantize_on": "auto"}}
        model, clip = ["qm", 0], ["qc", 0]
    p.update({
        "t": {"class_type": "QKBenchStepTimer", "inputs": {"model": model, "label": label}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": positive}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": negative}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": pipe.size, "height": pipe.size, "batch_size": 1}},
        "k": {"class_type": "KSampler", "inputs": {
            "model": ["t", 0], "seed": 0, "steps": steps, "cfg": pipe.cfg, "sampler_name": pipe.sampler,
            "scheduler": pipe.scheduler, "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["lat", 0], "denoise": 1.0}},
        "d": {"class_type": "VAEDecode", "inputs": {"samples": ["k", 0], "vae": ["v", 0]}},
        "s_load": {"class_type": "QKBenchSink", "inputs": {"a": ["t", 0], "b": clip, "c": ["v", 0]}},
        "s_encode": {"class_type": "QKBenchSink", "inputs": {"a": ["pos", 0], "b": ["neg", 0]}},
        "s_sample": {"class_type": "QKBenchSink", "inputs": {"a": ["k", 0]}},
        "s_decode": {"class_type": "QKBenchSink", "inputs": {"a": ["d", 0]}},
    })
    return p, {"load": "s_load", "encode": "s_encode", "sample": "s_sample", "decode": "s_decode"}


class _Server:
    """What PromptExecutor needs of ComfyUI's server when nobody listens."""
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, *args, **kwargs):
        pass

    def queue_updated(self):
        pass


def _executor():
    import execution
    return execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC,
                                    cache_args={"lru": 0, "ram": 0})


def _failure(executor) -> str:
    for event, data in executor.status_messages:
        if event == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_type')}: {str(data.get('exception_message')).strip()[:400]}"
    return "execution failed"


def _step_seconds(label: str) -> tuple:
    calls = STEP_TIMES.get(label, [])
    if not calls:
        return None, None
    times = [(a.elapsed_time(b) / 1000) if isinstance(a, torch.cuda.Event) else b - a for a, b, _ in calls]
    return statistics.median(times), max(n for _, _, n in calls)


def run_variant(env, executor, pipe, variant, steps, device, rec):
    label = f"{pipe.key}/{variant}"
    prompt, phases = graph(pipe, variant, steps, label)
    cuda = torch.device(device).type == "cuda"
    env.mm.unload_all_models()
    free(device)
    if cuda and torch.cuda.memory_allocated() > 64 * 2 ** 20:
        rec["note_start"] = f"{torch.cuda.memory_allocated() / 2 ** 30:.2f} GiB allocated at start"
    peaks, seconds = {}, {}
    for i, (phase, node) in enumerate(phases.items()):
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        executor.execute(prompt, f"{label}/{phase}", {}, [node])
        sync(device)
        seconds[phase] = time.perf_counter() - start
        if not executor.success:
            raise RuntimeError(f"{phase}: {_failure(executor)}")
        if cuda:
            peaks[phase] = torch.cuda.max_memory_allocated()
    step_s, batch = _step_seconds(label)
    rec.update(load_s=seconds.pop("load"), phase_s=seconds, total_s=sum(seconds.values()),
               step_s=step_s, batch_per_call=batch, steps=steps, size=pipe.size)
    if cuda:
        peaks.pop("load")
        rec.update(phase_peak_bytes=peaks, peak_bytes=max(peaks.values()))
    rec["note"] = f"cond+uncond batch {batch}" if batch else ""


def run(env, results, keys, full: bool, device, steps, deadline: float, variants=None):
    env.comfy_nodes.NODE_CLASS_MAPPINGS.update(BENCH_NODES)
    env.comfy_nodes.NODE_CLASS_MAPPINGS.update(env.pack.nodes.NODE_CLASS_MAPPINGS)
    specs = models.denoisers(full)
    steps = steps or (20 if full else 1)
    for key in keys:
        pipe = PIPELINES[key] if full else SMOKE_PIPELINE
        _CONTEXT.update(env=env, device=device, pipeline=pipe, denoiser=specs[pipe.denoiser])
        for variant in variants or (VARIANTS if full else SMOKE_VARIANTS):
            if variant not in VARIANTS:
                continue
            rec = results.record("pipeline", key, variant)
            rec["label"] = f"{specs[pipe.denoiser].label}, {pipe.size}², {'+'.join(pipe.encoders)}"
            if time.time() > deadline:
                rec["skipped"] = "time budget"
                continue
            # A fresh executor per variant, so that every variant starts from an empty GPU:
            # a shared one kept the previous variant's 16-bit text encoders cached (and,
            # built on the GPU, resident) and counted them in the next variant's peak.
            executor = _executor()
            try:
                run_variant(env, executor, pipe, variant, steps, device, rec)
            except Exception as exc:
                rec.setdefault("errors", {})["normal"] = _error_text(exc)
                log.warning("pipeline %s %s: %s", key, variant, rec["errors"]["normal"])
            finally:
                results.save()
                env.mm.unload_all_models()
                del executor
                free(device)
