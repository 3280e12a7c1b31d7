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
                                f"python -m bench.standins.build (bash .ci/test does)")
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
    if family == "auraflow":  # the Pile-T5-XL inside the AuraFlow checkpoint, as ComfyUI loads it
        path = standins_path() / "checkpoints" / "qk_auraflow_d2.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: build stand-ins with python -m bench.standins.build")
        return comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=True,
                                                     output_model=False)[1]
    raise ValueError(family)


def encode(clip, text: str):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return cond.float().clone(), (pooled.float().clone() if pooled is not None else None)
