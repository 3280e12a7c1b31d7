"""The stand-in architectures and how the benchmark builds them through ComfyUI.

Diffusion models are built the way ComfyUI's UNETLoader builds them
(comfy.sd.load_diffusion_model_state_dict: model config, inference dtype and manual-cast
dtype, get_model, load_model_weights), except that the model is created directly on the
run device from an in-memory state dict instead of a file through system RAM.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch

from .standins import components

FP8 = torch.float8_e4m3fn


def compute_dtype(device) -> torch.dtype:
    """The dtype quantized models compute in and are quantized from: bf16 on a GPU; fp32
    on a CPU, as ComfyUI runs diffusion models there (CPUs lack fast bf16 kernels)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@dataclass(frozen=True)
class Denoiser:
    key: str
    label: str
    class_name: str  # comfy.supported_models class
    config: dict
    recipe: str
    latent: int  # latent height/width (image size / 8)
    channels: int
    tokens: int  # context length of the conditioning
    context_dim: int
    y_dim: Optional[int]
    sigma: float  # an inference-time noise level for the model's sampling type


def _sdxl_small() -> dict:
    c = copy.deepcopy(components.SDXL_UNET)
    c.update(model_channels=64, transformer_depth=[0, 0, 1, 1, 1, 1], transformer_depth_middle=1,
             transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1])
    return c


def _sd15_small() -> dict:
    c = copy.deepcopy(components.SD15_UNET)
    c.update(model_channels=64, num_heads=4)
    return c


def denoisers(full: bool) -> dict:
    """Real sizes (full) or reduced ones for CPU runs: same classes, fewer/narrower blocks."""
    sd3_depth, pixart_depth = (24, 28) if full else (4, 1)
    big = 128 if full else 16
    specs = [
        Denoiser("sd15", "SD1.5 UNet", "SD15", components.SD15_UNET if full else _sd15_small(), "sd15",
                 64 if full else 16, 4, 77, 768, None, 1.0),
        Denoiser("sdxl", "SDXL UNet", "SDXL", components.SDXL_UNET if full else _sdxl_small(), "sdxl",
                 big, 4, 77, 2048, 2816, 1.0),
        Denoiser("sd3", f"SD3-medium MMDiT (depth {sd3_depth})", "SD3", components.sd3_unet(sd3_depth),
                 "sd3", big, 16, 154, 4096, 2048, 0.5),
        Denoiser("pixart", f"PixArt-Sigma (depth {pixart_depth})", "PixArtSigma",
                 components.pixart_sigma_unet(pixart_depth), "pixart", big if full else 40, 4, 300,
                 4096, None, 1.0),
    ]
    return {s.key: s for s in specs}


def meta_state_dict(spec: Denoiser) -> dict:
    return components.diffusion_model_file(spec.class_name, spec.config, torch.float16)


def build_diffusion(env, spec: Denoiser, sd: dict, dtype: torch.dtype, device):
    """A ModelPatcher holding ComfyUI's model for `spec` with weights `sd`, stored in `dtype`
    (fp8 gets ComfyUI's manual-cast ops, as UNETLoader's weight_dtype=fp8_e4m3fn does)."""
    import comfy.supported_models
    device = torch.device(device)
    cfg = getattr(comfy.supported_models, spec.class_name)(copy.deepcopy(spec.config))
    manual_cast = env.mm.unet_manual_cast(dtype, device, cfg.supported_inference_dtypes)
    cfg.set_inference_dtype(dtype, manual_cast)
    model = cfg.get_model(sd, "", device=device)
    model.load_model_weights(dict(sd), "")  # it pops the keys it loads
    model.to(device)
    return env.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def denoiser_inputs(spec: Denoiser, batch: int, device, seed: int = 0) -> dict:
    """Inputs of one sampling step with cfg batching (cond and uncond in one batch)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, spec.channels, spec.latent, spec.latent, generator=g, device=device)
    kw = {"c_crossattn": torch.randn(batch, spec.tokens, spec.context_dim, generator=g, device=device)}
    if spec.y_dim:
        kw["y"] = torch.randn(batch, spec.y_dim, generator=g, device=device)
    sigma = torch.full((batch,), spec.sigma, device=device)
    return {"x": x, "t": sigma, "kwargs": kw}


def step(patcher, inputs: dict) -> torch.Tensor:
    """One denoiser call through BaseModel.apply_model (what the samplers call), with the
    patcher's wrappers handed over as the samplers do (TorchCompileModel is one)."""
    options = dict(patcher.model_options.get("transformer_options", {}))
    options["wrappers"] = getattr(patcher, "wrappers", {})
    return patcher.model.apply_model(inputs["x"], inputs["t"], transformer_options=options,
                                     **inputs["kwargs"])


def raw_output(denoised: torch.Tensor, inputs: dict) -> torch.Tensor:
    """The network's own output (eps / velocity) from apply_model's denoised latent: for
    ComfyUI's EPS and CONST sampling, denoised = x - out * sigma. Errors are read on this,
    not on the denoised latent, which is mostly the input."""
    sigma = inputs["t"].view(-1, 1, 1, 1)
    return (inputs["x"] - denoised.float()) / sigma


# ---- text encoders ----------------------------------------------------------------------

@dataclass(frozen=True)
class Encoder:
    key: str
    label: str
    clip_type: str  # comfy.sd.CLIPType member
    recipe: str
    meta: str  # components function
    prompt_words: int = 40
    notes: str = field(default="")


ENCODERS = {
    "clip_l": Encoder("clip_l", "CLIP-L", "STABLE_DIFFUSION", "clip_l", "clip_l"),
    "clip_g": Encoder("clip_g", "CLIP-G", "STABLE_DIFFUSION", "clip_g", "clip_g"),
    "t5xxl": Encoder("t5xxl", "T5-XXL encoder", "SD3", "t5xxl", "t5xxl", prompt_words=60),
}


def encoder_meta_state_dict(spec: Encoder) -> dict:
    return getattr(components, spec.meta)(torch.float16)


def build_clip(env, spec: Encoder, sd: dict, dtype: torch.dtype, device):
    """comfy.sd.CLIP through ComfyUI's text-encoder loader, created on `device`."""
    device = torch.device(device)
    options = {"dtype": dtype, "initial_device": device, "offload_device": device, "load_device": device}
    return env.sd.load_text_encoder_state_dicts(
        [dict(sd)], clip_type=getattr(env.sd.CLIPType, spec.clip_type), model_options=options)


PROMPT = ("a lighthouse on a rocky cliff at sunset, waves crashing, seagulls, detailed oil painting, "
          "warm light, dramatic clouds, wide angle, high detail, by a master painter, award winning, "
          "trending, volumetric light, cinematic composition, rich colours, soft shadows")


def prompt(words: int) -> str:
    base = PROMPT.replace(",", "").split()
    return " ".join((base * (words // len(base) + 1))[:words])
