"""Small real ComfyUI models built in memory (no files): ComfyUI's own model classes from
its own configs, filled with deterministic random weights, loaded through its own loader."""
from __future__ import annotations

import torch

SD3_TINY_DEPTH = 4  # hidden 256: wide enough for GGUF K-quant blocks


def sd3_roundings(dtype) -> int:
    """Roundings each output value of one tiny SD3 call goes through (tests/harness/tolerances.py,
    3.): for each product on its longest path (7 a joint block: modulation, qkv, q.k, attention.v,
    proj, fc1, fc2; 2 before the blocks, 2 after) the widest sum (c_crossattn's 4096 terms) in
    float32, or in half precision, which sums in float32, the weight's, scale's and output's casts."""
    return (4096 if dtype == torch.float32 else 3) * (7 * SD3_TINY_DEPTH + 4)


def heavy_tailed(shape, seed: int, std: float = 0.02) -> torch.Tensor:
    """Student-t (3 degrees of freedom) scaled to `std`: outliers like trained weights."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(shape, generator=g)
    chi2 = torch.randn((3, *shape), generator=g).pow(2).sum(0)
    t = normal / torch.sqrt(chi2 / 3)
    return t * (std / (3 ** 0.5))  # a t(3) variable has variance 3


def _gaussian(shape, seed: int, std: float = 0.02) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


def fill_state_dict(meta_sd: dict, seed: int, heavy: bool = True, dtype=torch.float16) -> dict:
    out = {}
    for i, (key, t) in enumerate(sorted(meta_sd.items())):
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "bias":
            value = torch.zeros(t.shape)
        elif t.dim() <= 1:
            value = torch.ones(t.shape)
        elif heavy:
            value = heavy_tailed(tuple(t.shape), seed + i)
        else:
            g = torch.Generator().manual_seed(seed + i)
            value = torch.randn(tuple(t.shape), generator=g) * 0.02
        out[key] = value.to(dtype)
    return out


def tiny_sd3_state_dict(seed: int = 7, heavy: bool = True, dtype=torch.float16) -> dict:
    from bench.standins import components as c  # the stand-in builder knows ComfyUI's key names
    meta = c.diffusion_model_file("SD3", c.sd3_unet(SD3_TINY_DEPTH))
    return fill_state_dict(meta, seed, heavy, dtype)


def tiny_sd3_patcher(seed: int = 7, heavy: bool = True, file_dtype=torch.float16):
    import comfy.sd
    return comfy.sd.load_diffusion_model_state_dict(tiny_sd3_state_dict(seed, heavy, file_dtype))


def sd3_inputs(batch: int = 2, size: int = 16, tokens: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, 16, size, size, generator=g),
        t=torch.full((batch,), 0.5),
        c_crossattn=torch.randn(batch, tokens, 4096, generator=g),
        y=torch.randn(batch, 2048, generator=g),
    )


def denoise(patcher, inputs: dict) -> torch.Tensor:
    """One denoiser call through ComfyUI's loading (patches applied) on its device."""
    import comfy.model_management as mm
    mm.load_models_gpu([patcher])
    with torch.inference_mode():
        return patcher.model.apply_model(inputs["x"], inputs["t"], c_crossattn=inputs["c_crossattn"],
                                         y=inputs["y"]).float().clone()


def tiny_lora(patcher, seed=3, rank=4, heavy=True):
    """A LoRA on three quantized Linear layers, strong enough to see through 4-bit noise
    (heavy=False: Gaussian factors, for tests that band errors by the Gaussian bound)."""
    targets = ["diffusion_model.joint_blocks.0.x_block.attn.qkv",
               "diffusion_model.joint_blocks.1.context_block.mlp.fc1",
               "diffusion_model.joint_blocks.2.x_block.attn.proj"]
    sd = patcher.model.state_dict()
    lora = {}
    for i, key in enumerate(targets):
        out_f, in_f = sd[key + ".weight"].shape
        draw = heavy_tailed if heavy else _gaussian
        lora[f"{key}.lora_up.weight"] = draw((out_f, rank), seed + i, std=0.6).half()
        lora[f"{key}.lora_down.weight"] = draw((rank, in_f), seed + 10 + i, std=0.6).half()
    return lora, targets


def with_lora(model, lora):
    import comfy.sd
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    return patched


def sample_eager_and_compiled(comfy_nodes, model, inputs: dict, steps: int = 2):
    """(eager latent, compiled latent, compiled MODEL): a short KSampler run on the tiny
    SD3 before and after ComfyUI's TorchCompileModel node (inductor)."""
    pos = [[inputs["c_crossattn"][:1], {"pooled_output": inputs["y"][:1]}]]
    neg = [[inputs["c_crossattn"][1:], {"pooled_output": inputs["y"][1:]}]]
    latent = {"samples": torch.zeros(1, 16, 16, 16)}

    def sample(m):
        return comfy_nodes.KSampler().sample(m, 1, steps, 3.0, "euler", "simple", pos, neg, latent)[0]["samples"]

    eager = sample(model)
    out = comfy_nodes.NODE_CLASS_MAPPINGS["TorchCompileModel"].execute(model, "inductor")
    compiled_model = out[0] if isinstance(out, tuple) else out.result[0]
    return eager, sample(compiled_model), compiled_model
