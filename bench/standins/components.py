"""State dicts of stand-in models, built from ComfyUI's own classes on the meta device.

Nothing here allocates weights: every tensor is a meta tensor (shape and dtype only), except
the few literal buffers ComfyUI's checkpoint-saving conversion creates (CLIP position ids).
Names come from ComfyUI itself: `model_config.get_model(...)` for the diffusion model,
the text-encoder classes its loaders instantiate, and `BaseModel.state_dict_for_saving`,
which applies each family's `process_*_state_dict_for_saving`, for checkpoints.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Dict

import torch

from .comfy_import import import_comfy

META = torch.device("meta")


@contextlib.contextmanager
def meta_build(device_context: bool = True):
    """Build on the meta device with layers that create their weights: under Dynamic VRAM
    (ComfyUI 0.16+, aimdo enabled) core's layers start without weights until loaded, and a
    model built that way would have no weight names to read."""
    try:
        import comfy.memory_management as memory
    except ImportError:  # ComfyUI before 0.16
        memory = None
    saved = getattr(memory, "aimdo_enabled", None)
    if saved is not None:
        memory.aimdo_enabled = False
    try:
        if device_context:
            with META:
                yield
        else:
            yield
    finally:
        if saved is not None:
            memory.aimdo_enabled = saved

# Diffusion-model configs as ComfyUI's detection reports them for the real models
# (comfy/model_detection.py: unet_config_from_diffusers_unet for SD1.5/SDXL, detect_unet_config
# for the DiTs); `dtype` is set per build. build-time check: detection on the built state dict
# must give back the same model class and the same tensor shapes.
SD15_UNET = {
    'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True, 'legacy': False,
    'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320, 'num_res_blocks': [2, 2, 2, 2],
    'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0], 'channel_mult': [1, 2, 4, 4], 'transformer_depth_middle': 1,
    'use_linear_in_transformer': False, 'context_dim': 768, 'num_heads': 8,
    'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    'use_temporal_attention': False, 'use_temporal_resblock': False,
}
SDXL_UNET = {
    'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True, 'legacy': False,
    'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4, 'model_channels': 320,
    'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10], 'channel_mult': [1, 2, 4],
    'transformer_depth_middle': 10, 'use_linear_in_transformer': True, 'context_dim': 2048, 'num_head_channels': 64,
    'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
    'use_temporal_attention': False, 'use_temporal_resblock': False,
}
SD3_POS_EMBED_MAX = 192  # SD3-medium: 192x192 patches


def sd3_unet(depth: int) -> dict:
    hidden = 64 * depth  # ComfyUI's MMDiT: hidden size = 64 * depth, heads = depth
    return {
        "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": depth, "input_size": None,
        "adm_in_channels": 2048,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": hidden}},
        "num_patches": SD3_POS_EMBED_MAX ** 2, "pos_embed_max_size": SD3_POS_EMBED_MAX,
        "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
    }


def pixart_sigma_unet(depth: int) -> dict:
    # Detection fixes hidden 1152 / 16 heads / patch 2 and counts the blocks; no ar_embedder
    # keys (micro_condition False) means Sigma. Sigma's captions are 300 tokens.
    return {"num_heads": 16, "patch_size": 2, "hidden_size": 1152, "in_channels": 4, "depth": depth,
            "model_max_length": 300, "image_model": "pixart_sigma", "micro_condition": False}


def flux_unet(depth: int, single_depth: int) -> dict:
    """FLUX.1 [dev] (guidance embedder, CLIP-L pooled input) at `depth` double-stream and
    `single_depth` single-stream blocks; the real model has 19 and 38. ComfyUI 0.3.75's
    detection fixes 24 heads of 128 (hidden 3072); later ones derive the heads from the width."""
    import_comfy()
    import dataclasses
    from comfy.ldm.flux.model import FluxParams
    config = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
              "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24,
              "depth": depth, "depth_single_blocks": single_depth, "axes_dim": [16, 56, 56],
              "theta": 10000, "qkv_bias": True, "guidance_embed": True, "patch_size": 2}
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:  # ComfyUI 0.4+
        config["txt_ids_dims"] = []
    return config


def auraflow_unet(double_layers: int, layers: int) -> dict:
    """AuraFlow's MMDiT: `double_layers` joint blocks of `layers` in all (v0.3: 4 of 36). Width
    3072 and 12 heads are the class's defaults (detection reads neither); max_seq is read
    from the positional encoding: 32 x 32 patches, the class's default."""
    return {"max_seq": 1024, "cond_seq_dim": 2048, "n_double_layers": double_layers, "n_layers": layers}


def bfl_names(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Flux tensors as Black Forest Labs' files name them: RMSNorm scales end in `_norm.scale`.
    ComfyUI 0.3.75 builds them so; later versions build `_norm.weight` and rename `.scale`
    on load (Flux.process_unet_state_dict), so a file with `.scale` loads on both."""
    return {(k[:-len(".weight")] + ".scale" if k.endswith("_norm.weight") else k): v
            for k, v in state_dict.items()}


def _model_config(class_name: str, unet_config: dict, dtype: torch.dtype):
    import_comfy()
    import comfy.supported_models
    cls = getattr(comfy.supported_models, class_name)
    cfg = cls(copy.deepcopy(unet_config))
    cfg.set_inference_dtype(dtype, None)
    return cfg


def diffusion_model(class_name: str, unet_config: dict, dtype: torch.dtype):
    """ComfyUI BaseModel (wrapper with .diffusion_model) built on the meta device."""
    cfg = _model_config(class_name, unet_config, dtype)
    try:
        with meta_build():  # also catches tensors a constructor creates without a device argument
            return cfg.get_model({}, "", device=META)
    except RuntimeError as e:
        if "meta" not in str(e):
            raise
    # Some constructors compute with tensors (PixArt: torch.linspace(...).item()): build with
    # device=meta only; the few small tensors they create without it land on the CPU.
    with meta_build(device_context=False):
        return cfg.get_model({}, "", device=META)


def detected_class(state_dict: Dict[str, torch.Tensor]) -> tuple[str, dict]:
    """What ComfyUI's detection makes of a (meta) state dict: (model config class, unet config)."""
    import_comfy()
    import comfy.model_detection as md
    prefix = md.unet_prefix_from_state_dict(state_dict)
    if not any(k.startswith(prefix) for k in state_dict):
        prefix = ""
    cfg = md.model_config_from_unet(state_dict, prefix)
    if cfg is None:
        return "none", {}
    return type(cfg).__name__, cfg.unet_config


def verify_detection(state_dict: Dict[str, torch.Tensor], expected_class: str, dtype: torch.dtype) -> None:
    """Detection must name `expected_class`, and a model built from the detected config must
    hold exactly the diffusion-model tensors (names and shapes) of `state_dict`."""
    import_comfy()
    import comfy.model_detection as md
    name, unet_config = detected_class(state_dict)
    if name != expected_class:
        raise RuntimeError(f"ComfyUI detects {name}, expected {expected_class}")
    prefix = md.unet_prefix_from_state_dict(state_dict)
    if not any(k.startswith(prefix) for k in state_dict):
        prefix = ""
    config = {k: v for k, v in unet_config.items() if k not in ("dtype",)}
    # as ComfyUI's loader renames the file's tensors before loading them (e.g. Flux's .scale)
    loaded = _model_config(expected_class, config, dtype).process_unet_state_dict(
        {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
    mine = {k: tuple(v.shape) for k, v in loaded.items()}
    model = diffusion_model(expected_class, config, dtype)
    theirs = {k: tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()}
    if mine != theirs:
        missing = sorted(set(theirs) - set(mine))[:5]
        extra = sorted(set(mine) - set(theirs))[:5]
        shapes = [k for k in set(mine) & set(theirs) if mine[k] != theirs[k]][:5]
        raise RuntimeError(f"detected {name} but tensors differ: missing {missing}, extra {extra}, shapes {shapes}")


# ---- text encoders ---------------------------------------------------------------------------

def clip_l(dtype=torch.float16) -> Dict[str, torch.Tensor]:
    """Standalone CLIP-L (the format CLIPLoader/DualCLIPLoader/TripleCLIPLoader read)."""
    import_comfy()
    import comfy.sd1_clip
    with meta_build():
        m = comfy.sd1_clip.SDClipModel(device=META, dtype=dtype)
    return dict(m.transformer.state_dict())


def clip_g(dtype=torch.float16) -> Dict[str, torch.Tensor]:
    """Standalone CLIP-G (OpenCLIP bigG text tower in Hugging Face naming)."""
    import_comfy()
    import comfy.sdxl_clip
    with meta_build():
        m = comfy.sdxl_clip.SDXLClipG(device=META, dtype=dtype)
    return dict(m.transformer.state_dict())


def t5xxl(dtype=torch.float16) -> Dict[str, torch.Tensor]:
    """Standalone T5-XXL encoder (all 24 blocks, shared embedding), as sd3/pixart/flux TEs load."""
    import_comfy()
    import comfy.text_encoders.sd3_clip
    with meta_build():
        m = comfy.text_encoders.sd3_clip.T5XXLModel(device=META, dtype=dtype)
    return dict(m.transformer.state_dict())


def pile_t5xl(dtype=torch.float16) -> Dict[str, torch.Tensor]:
    """AuraFlow's Pile-T5-XL encoder (24 UMT5-style blocks, 2048 wide), as AuraT5Model holds it."""
    import_comfy()
    import comfy.text_encoders.aura_t5
    with meta_build():
        m = comfy.text_encoders.aura_t5.PT5XlModel(device=META, dtype=dtype)
    return dict(m.transformer.state_dict())


def checkpoint_clip(clip_class, dtype=torch.float16) -> Dict[str, torch.Tensor]:
    """What comfy.sd.CLIP.get_sd() returns for a text-encoder wrapper class (clip_l./clip_g. names)."""
    with meta_build():
        m = clip_class(device=META, dtype=dtype)
    return dict(m.state_dict())


# ---- VAEs ------------------------------------------------------------------------------------

_KL_DDCONFIG = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
                'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}


def vae_kl4() -> Dict[str, torch.Tensor]:
    """SD1.x / SDXL VAE (4 latent channels, with quant convs), as comfy.sd.VAE builds it."""
    import_comfy()
    from comfy.ldm.models.autoencoder import AutoencoderKL
    with meta_build():
        m = AutoencoderKL(ddconfig=dict(_KL_DDCONFIG), embed_dim=4)
    return dict(m.state_dict())


def vae_sd3() -> Dict[str, torch.Tensor]:
    """SD3 VAE (16 latent channels, no quant convs), as comfy.sd.VAE builds it."""
    import_comfy()
    from comfy.ldm.models.autoencoder import AutoencodingEngine
    ddconfig = dict(_KL_DDCONFIG, z_channels=16)
    with meta_build():
        m = AutoencodingEngine(
            regularizer_config={'target': "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={'target': "comfy.ldm.modules.diffusionmodules.model.Encoder", 'params': ddconfig},
            decoder_config={'target': "comfy.ldm.modules.diffusionmodules.model.Decoder", 'params': ddconfig})
    return dict(m.state_dict())


# ---- whole files -----------------------------------------------------------------------------

def checkpoint(class_name: str, unet_config: dict, clip_sd: Dict[str, torch.Tensor],
               vae_sd: Dict[str, torch.Tensor], dtype=torch.float16) -> Dict[str, torch.Tensor]:
    """A full checkpoint's state dict through ComfyUI's own saving conversion
    (what comfy.sd.save_checkpoint / CheckpointSave would write)."""
    model = diffusion_model(class_name, unet_config, dtype)
    parts = dict(clip_state_dict=clip_sd, vae_state_dict=vae_sd)
    # ComfyUI 0.33 takes the UNet's state dict first; 0.3.75 reads it from the model itself
    if "unet_state_dict" in inspect.signature(model.state_dict_for_saving).parameters:
        parts["unet_state_dict"] = model.diffusion_model.state_dict()
    return dict(model.state_dict_for_saving(**parts))


def diffusion_model_file(class_name: str, unet_config: dict, dtype=torch.float16) -> Dict[str, torch.Tensor]:
    """A diffusion-model-only file (UNETLoader / load_diffusion_model), without a key prefix."""
    return dict(diffusion_model(class_name, unet_config, dtype).diffusion_model.state_dict())
