"""The stand-in text encoders, loaded with ComfyUI's own CLIP loader."""
from __future__ import annotations

import torch

from .locations import standins_path

PROMPTS = ["a lighthouse on a cliff at sunset, detailed oil painting",
           "portrait of an old sailor, dramatic light, 85mm photo"]


def te_path(name: str) -> str:
    path = standins_path() / "text_encoders" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: build stand-ins with "
                                f"python -m tests.standins.build (bash .ci/test does)")
    return str(path)


def load_family_clip(family: str):
    import comfy.sd
    T = comfy.sd.CLIPType
    if family == "sd15":
        return comfy.sd.load_clip([te_path("qk_clip_l.safetensors")], clip_type=T.STABLE_DIFFUSION)
    if family == "sdxl":
        return comfy.sd.load_clip([te_path("qk_clip_l.safetensors"), te_path("qk_clip_g.safetensors")],
                                  clip_type=T.STABLE_DIFFUSION)
    if family == "sd3":
        return comfy.sd.load_clip([te_path("qk_clip_l.safetensors"), te_path("qk_clip_g.safetensors"),
                                   te_path("qk_t5xxl_fp8.safetensors")], clip_type=T.SD3)
    if family == "pixart":
        return comfy.sd.load_clip([te_path("qk_t5xxl_fp8.safetensors")], clip_type=T.PIXART,
                                  model_options={"dtype": torch.float8_e4m3fn})
    raise ValueError(family)


def encode(clip, text: str):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return cond.float().clone(), (pooled.float().clone() if pooled is not None else None)
