"""Which formats a run measures: ComfyUI's own baselines and every QuantKit format.

Baselines are not QuantKit formats: 'bf16' / 'fp16' are the unquantized model in that
dtype, 'comfy:fp8_e4m3fn' is what UNETLoader's weight_dtype=fp8_e4m3fn (and CLIPLoader
with dtype fp8) builds: fp8 weights with ComfyUI's manual-cast ops. Diffusion-model
baselines come through ComfyUI's own loader (bench/native_models.py), as UNETLoader makes
them (with Dynamic VRAM where that is on); LOADED ones are checkpoints in core's own
quantized layout (current ComfyUI only).
A format id with the suffix PER_LAYER is that format with decode groups off: each layer
decodes its own weight, as before decode groups (the same-run comparison).
"""
from __future__ import annotations

import torch

BASELINES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "comfy:fp8_e4m3fn": torch.float8_e4m3fn}
LOADED = {"core:float8_e4m3fn": "float8_e4m3fn", "core:int8_tensorwise": "int8_tensorwise"}  # -> layout
PER_LAYER = "/per-layer"
REFERENCE = "bf16"
# Small set for the CPU smoke run: one of each kind that runs on a CPU.
SMOKE = ("bf16", "comfy:fp8_e4m3fn", "torchao:int8wo", "gguf:Q8_0", "gguf:Q4_0", "quanto:int8")
# Formats whose GGUF file load time is measured (writing a file costs seconds per model).
GGUF_LOAD = ("gguf:Q8_0", "gguf:Q4_K", "gguf:Q4_0")


def all_formats(registry) -> list:
    return list(BASELINES) + list(LOADED) + list(registry.all_format_ids())


def base(format_id: str) -> str:
    """The format a (possibly per-layer) benchmark format id measures."""
    return format_id.removesuffix(PER_LAYER)


def resolve(spec: str, registry, reference: str = REFERENCE) -> list:
    """'all', 'smoke', or a comma list; 'gguf:*' selects a whole backend. The reference
    (bf16; fp32 on a CPU) is always measured first (errors are read against it)."""
    known = all_formats(registry)
    out = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item == "all":
            out += [f for f in known if f != "fp32"]
        elif item == "smoke":
            out += list(SMOKE)
        elif item.endswith(":*"):
            out += [f for f in known if f.startswith(item[:-1])]
        elif base(item) in known:
            out.append(item)
        else:
            raise SystemExit(f"unknown format {item!r}; known: {', '.join(known)}")
    out = [reference] + [f for f in out if f != reference]
    return list(dict.fromkeys(out))


def problem(format_id: str, registry, device) -> str | None:
    """Why `format_id` cannot run here (package or hardware), or None."""
    format_id = base(format_id)
    if format_id in BASELINES:
        return None
    if format_id in LOADED:
        import comfy.utils
        if not hasattr(comfy.utils, "detect_layer_quantization"):
            return "core's per-layer quantized checkpoints need current ComfyUI (0.8 or later)"
        return None
    adapter, spec = registry.get_format(format_id)
    return registry.usable_problem(adapter, spec, torch.device(device))


def bits(format_id: str, registry) -> float:
    format_id = base(format_id)
    if format_id in LOADED:
        return 8.0
    if format_id in BASELINES:
        return 8.0 if "fp8" in format_id else 32.0 if format_id == "fp32" else 16.0
    return registry.get_format(format_id)[1].bits_per_weight
