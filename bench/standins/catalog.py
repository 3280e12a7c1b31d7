"""Which stand-in files exist, what each holds, and which families need them (data).

Paths are relative to a ComfyUI models tree, so an extra_model_paths.yaml can point at it.
Each file's tensors get seed names from `components`: the same CLIP-L, CLIP-G or VAE gets
the same values wherever it is stored (a checkpoint or a standalone file).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

# Bump when any recipe, fill rule or file layout changes: stamps from older versions rebuild.
GENERATOR_VERSION = 2
SEED = 20240611

SD3_DEPTH = 2
SD3_TINY_DEPTH = 1
PIXART_DEPTH = 2
# Flux and AuraFlow are 3072 wide at any depth: one block of each kind is the least that
# holds every layer kind their recipes name (detection needs one double block, no single one).
FLUX_DEPTH = 1, 1  # double-stream, single-stream blocks
AURAFLOW_DEPTH = 1, 2  # joint (double) layers, all layers


@dataclass(frozen=True)
class StandIn:
    name: str                  # key in ensure_standins()'s result
    relpath: str               # under the models tree
    families: Tuple[str, ...]
    dtype: torch.dtype         # every floating tensor is stored in this dtype
    build: Callable[[], Dict[str, torch.Tensor]]  # meta state dict with the final names
    detect: Optional[str]      # model config class ComfyUI must detect (diffusion models)
    # (key prefix in this file, component name): seeds are "<component>:<key minus prefix>"
    components: Tuple[Tuple[str, str], ...] = ()
    notes: str = ""

    def seed_name(self, key: str) -> str:
        for prefix, component in self.components:
            if key.startswith(prefix):
                return f"{component}:{key[len(prefix):]}"
        return f"{self.name}:{key}"


def _sd15():
    from . import components as c
    c.import_comfy()
    import comfy.sd1_clip
    return c.checkpoint("SD15", c.SD15_UNET, c.checkpoint_clip(comfy.sd1_clip.SD1ClipModel), c.vae_kl4())


def _sdxl():
    from . import components as c
    c.import_comfy()
    import comfy.sdxl_clip
    return c.checkpoint("SDXL", c.SDXL_UNET, c.checkpoint_clip(comfy.sdxl_clip.SDXLClipModel), c.vae_kl4())


def _sd3():
    from . import components as c
    c.import_comfy()
    import comfy.text_encoders.sd3_clip as sd3_clip
    te = sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=False)
    return c.checkpoint("SD3", c.sd3_unet(SD3_DEPTH), c.checkpoint_clip(te), c.vae_sd3())


def _sd3_tiny():
    from . import components as c
    return c.diffusion_model_file("SD3", c.sd3_unet(SD3_TINY_DEPTH))


def _pixart():
    from . import components as c
    return c.diffusion_model_file("PixArtSigma", c.pixart_sigma_unet(PIXART_DEPTH))


def _flux():
    from . import components as c
    return c.bfl_names(c.diffusion_model_file("Flux", c.flux_unet(*FLUX_DEPTH)))


def _auraflow():
    from . import components as c
    c.import_comfy()
    import comfy.text_encoders.aura_t5
    return c.checkpoint("AuraFlow", c.auraflow_unet(*AURAFLOW_DEPTH),
                        c.checkpoint_clip(comfy.text_encoders.aura_t5.AuraT5Model), c.vae_kl4())


def _component(fn_name: str):
    def build():
        from . import components as c
        return getattr(c, fn_name)()
    return build


# Where each shared component sits in each file layout.
_CLIP_L = (("cond_stage_model.transformer.", "clip_l"),             # SD1.5 checkpoint
           ("conditioner.embedders.0.transformer.", "clip_l"),      # SDXL checkpoint
           ("text_encoders.clip_l.transformer.", "clip_l"))         # SD3 checkpoint
_CLIP_G = (("conditioner.embedders.1.model.", "clip_g_openclip"),   # SDXL: OpenCLIP naming
           ("text_encoders.clip_g.transformer.", "clip_g"))
_KL4 = (("first_stage_model.", "vae_kl4"),)
_SD3_VAE = (("first_stage_model.", "vae_sd3"),)
_PILE_T5 = (("text_encoders.pile_t5xl.transformer.", "pile_t5xl"),)
_AURAFLOW_VAE = (("vae.", "vae_kl4"),)  # AuraFlow checkpoints keep the VAE under vae.

STANDINS: Tuple[StandIn, ...] = (
    StandIn("sd15", "checkpoints/qk_sd15.safetensors", ("sd15",), torch.float16, _sd15, "SD15",
            _CLIP_L + _KL4, "full-size SD1.5: UNet + CLIP-L + VAE"),
    StandIn("sdxl", "checkpoints/qk_sdxl.safetensors", ("sdxl",), torch.float16, _sdxl, "SDXL",
            _CLIP_L + _CLIP_G + _KL4, "full-size SDXL base: UNet + CLIP-L + CLIP-G + VAE"),
    StandIn("sdxl_vae", "vae/qk_sdxl_vae.safetensors", ("sdxl", "pixart"), torch.float16,
            _component("vae_kl4"), None, (("", "vae_kl4"),), "SDXL VAE (also PixArt-Sigma's)"),
    StandIn("sd3_d2", "checkpoints/qk_sd3_d2.safetensors", ("sd3",), torch.float16, _sd3, "SD3",
            _CLIP_L + _CLIP_G + _SD3_VAE, f"SD3 MMDiT depth {SD3_DEPTH} + CLIP-L + CLIP-G + SD3 VAE"),
    StandIn("sd3_tiny", "diffusion_models/qk_sd3_tiny.safetensors", ("sd3", "sd3_tiny"), torch.float16,
            _sd3_tiny, "SD3", (), f"SD3 MMDiT depth {SD3_TINY_DEPTH} (hidden {64 * SD3_TINY_DEPTH})"),
    StandIn("sd3_vae", "vae/qk_sd3_vae.safetensors", ("sd3", "sd3_tiny", "flux"), torch.float16,
            _component("vae_sd3"), None, (("", "vae_sd3"),),
            "SD3 VAE (16 latent channels; Flux's has the same tensors)"),
    StandIn("clip_l", "text_encoders/qk_clip_l.safetensors", ("sd3", "sd3_tiny", "flux"), torch.float16,
            _component("clip_l"), None, (("", "clip_l"),), "CLIP-L text encoder"),
    StandIn("clip_g", "text_encoders/qk_clip_g.safetensors", ("sd3",), torch.float16,
            _component("clip_g"), None, (("", "clip_g"),), "CLIP-G text encoder"),
    StandIn("t5xxl_fp8", "text_encoders/qk_t5xxl_fp8.safetensors", ("sd3", "pixart", "flux"), torch.float8_e4m3fn,
            _component("t5xxl"), None, (("", "t5xxl"),), "full T5-XXL encoder, float8_e4m3fn"),
    StandIn("pixart_sigma_d2", "diffusion_models/qk_pixart_sigma_d2.safetensors", ("pixart",), torch.float16,
            _pixart, "PixArtSigma", (), f"PixArt-Sigma depth {PIXART_DEPTH} (hidden 1152, 16 heads)"),
    StandIn("flux_d1", "diffusion_models/qk_flux_d1.safetensors", ("flux",), torch.float16, _flux, "Flux", (),
            f"FLUX.1 [dev] with {FLUX_DEPTH[0]} double- and {FLUX_DEPTH[1]} single-stream block (hidden 3072)"),
    StandIn("auraflow_d2", "checkpoints/qk_auraflow_d2.safetensors", ("auraflow",), torch.float16, _auraflow,
            "AuraFlow", _PILE_T5 + _AURAFLOW_VAE, f"AuraFlow MMDiT with {AURAFLOW_DEPTH[0]} joint layer of "
            f"{AURAFLOW_DEPTH[1]} (hidden 3072) + full Pile-T5-XL encoder + SDXL VAE"),
)

FAMILIES: Tuple[str, ...] = ("sd15", "sdxl", "sd3", "sd3_tiny", "pixart", "flux", "auraflow")


def for_families(families) -> Tuple[StandIn, ...]:
    wanted = set(families)
    unknown = wanted - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown stand-in families {sorted(unknown)}; known: {', '.join(FAMILIES)} (or 'all')")
    return tuple(s for s in STANDINS if wanted & set(s.families))
