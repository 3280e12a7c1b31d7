"""Small diffusers denoisers, transformers text encoders and a whole SD3 pipeline, built
from configs in memory (no downloads): the libraries' own classes with the real families'
layer names, widths of 256 and more (GGUF K-quant blocks, recipes' minimum layer size),
Linear/Conv weights drawn N(0, 0.02) as the format bands of tolerances.py assume, and
tokenizers made from a vocabulary of single letters."""
from __future__ import annotations

import string

import torch
import torch.nn as nn

WIDTH = 256  # hidden size of every tiny model: one GGUF super-block
T5_WIDTH = 512  # SD3 pads CLIP-L + CLIP-G (256 + 256) to T5's width
TOKENS = 16  # tokenizer and position-embedding length


def seeded(make, seed: int):
    """make() with torch's global generator seeded (and restored after): the constructors
    draw biases, embeddings and norms from it, so the same seed builds the same model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def gaussian_weights_(module: nn.Module, seed: int) -> nn.Module:
    """Every Linear/Conv weight N(0, 0.02), deterministic; everything else as constructed."""
    # offset: noise_reference draws its noise from small seeds in the same (sorted) layer
    # order; the same seed would make the "noise" a copy of the weights
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for _, m in sorted(module.named_modules(), key=lambda item: item[0]):
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
    return module.eval()


def sd3_transformer(seed: int = 0, layers: int = 2):
    from diffusers import SD3Transformer2DModel
    return gaussian_weights_(seeded(lambda: SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
        attention_head_dim=64, num_attention_heads=WIDTH // 64, caption_projection_dim=WIDTH,
        joint_attention_dim=T5_WIDTH, pooled_projection_dim=2 * WIDTH, pos_embed_max_size=32), seed), seed)


def unet(seed: int = 0):
    from diffusers import UNet2DConditionModel
    return gaussian_weights_(seeded(lambda: UNet2DConditionModel(
        block_out_channels=(64, 128), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=WIDTH,
        attention_head_dim=(2, 4), norm_num_groups=32,
        # SDXL's added text/time embedding, and a class embedding as SD2's unCLIP/upscaler have
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + WIDTH, class_embed_type="timestep"), seed), seed)


def pixart_transformer(seed: int = 0):
    from diffusers import PixArtTransformer2DModel
    return gaussian_weights_(seeded(lambda: PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=64, num_attention_heads=WIDTH // 64,
        caption_channels=WIDTH, in_channels=4, cross_attention_dim=WIDTH, out_channels=8,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6), seed), seed)


def flux_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel
    return gaussian_weights_(seeded(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64,
        num_attention_heads=WIDTH // 64, joint_attention_dim=WIDTH, pooled_projection_dim=WIDTH // 2,
        axes_dims_rope=[16, 24, 24], guidance_embeds=True), seed), seed)


def auraflow_transformer(seed: int = 0):
    from diffusers import AuraFlowTransformer2DModel
    return gaussian_weights_(seeded(lambda: AuraFlowTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_mmdit_layers=1,
        num_single_dit_layers=1, attention_head_dim=64, num_attention_heads=WIDTH // 64,
        joint_attention_dim=WIDTH, caption_projection_dim=WIDTH, pos_embed_max_size=64), seed), seed)


def clip_text_encoder(seed: int = 0, projection: bool = True, layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    config = CLIPTextConfig(vocab_size=len(clip_vocab()), hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                            num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=TOKENS,
                            projection_dim=WIDTH, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                            hidden_act="gelu")
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return gaussian_weights_(seeded(lambda: cls(config), seed), seed)


def t5_encoder(seed: int = 0):
    from transformers import T5Config, T5EncoderModel
    config = T5Config(vocab_size=len(t5_vocab()), d_model=T5_WIDTH, d_kv=64, d_ff=2 * T5_WIDTH,
                      num_layers=1, num_heads=T5_WIDTH // 64, feed_forward_proj="gated-gelu",
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    return gaussian_weights_(seeded(lambda: T5EncoderModel(config), seed), seed)


def clip_vocab() -> dict:
    letters = string.ascii_lowercase
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    return {t: i for i, t in enumerate(tokens)}


def t5_vocab() -> list:
    letters = string.ascii_lowercase
    return [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0),
            *((c, -3.0) for c in letters), *(("\u2581" + c, -3.0) for c in letters)]


def clip_tokenizer():
    from transformers import CLIPTokenizer
    return CLIPTokenizer(vocab=clip_vocab(), merges=[], model_max_length=TOKENS)


def t5_tokenizer():
    from transformers import T5Tokenizer
    return T5Tokenizer(vocab=t5_vocab(), extra_ids=0, model_max_length=TOKENS)


def sd3_vae(seed: int = 0):
    from diffusers import AutoencoderKL
    return gaussian_weights_(seeded(lambda: AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
        latent_channels=16, norm_num_groups=16, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035, sample_size=32), seed), seed)


def sd3_pipeline(seed: int = 0):
    """StableDiffusion3Pipeline: CLIP-L, CLIP-G and T5 encoders, the MMDiT, a VAE (one block
    each, for speed); images of 32x32 pixels (16x16 latents)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    return StableDiffusion3Pipeline(
        transformer=sd3_transformer(seed, layers=1), scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=sd3_vae(seed + 1), text_encoder=clip_text_encoder(seed + 2, layers=1), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text_encoder(seed + 3, layers=1), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(seed + 4), tokenizer_3=t5_tokenizer())


SD3_CALL = dict(prompt="a cat", height=32, width=32, num_inference_steps=2, max_sequence_length=TOKENS,
                output_type="latent")


def sd3_latents(pipe, seed: int = 0) -> torch.Tensor:
    """The pipeline's output latents for a fixed prompt and seed (CFG on)."""
    with torch.no_grad():
        return pipe(**SD3_CALL, generator=torch.Generator().manual_seed(seed)).images


DENOISERS = {"sd3": sd3_transformer, "unet": unet, "pixart": pixart_transformer,
             "flux": flux_transformer, "auraflow": auraflow_transformer}
TEXT_ENCODERS = {"clip": clip_text_encoder, "t5": t5_encoder}
BUILDERS = {**DENOISERS, **TEXT_ENCODERS}


def inputs(family: str, seed: int = 0) -> dict:
    """Keyword arguments for one forward pass of BUILDERS[family] (batch of one)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g)

    t = torch.tensor([500.0])
    context = randn(1, 8, WIDTH)
    if family == "sd3":
        return dict(hidden_states=randn(1, 16, 16, 16), encoder_hidden_states=randn(1, 8, T5_WIDTH),
                    pooled_projections=randn(1, 2 * WIDTH), timestep=t)
    if family == "unet":
        return dict(sample=randn(1, 4, 16, 16), timestep=t, encoder_hidden_states=context,
                    class_labels=torch.tensor([3.0]),
                    added_cond_kwargs={"text_embeds": randn(1, WIDTH),
                                       "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])})
    if family == "pixart":
        return dict(hidden_states=randn(1, 4, 8, 8), encoder_hidden_states=context, timestep=t,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if family == "flux":
        return dict(hidden_states=randn(1, 64, 16), encoder_hidden_states=context,
                    pooled_projections=randn(1, WIDTH // 2), timestep=torch.tensor([0.5]),
                    img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))
    if family == "auraflow":
        return dict(hidden_states=randn(1, 4, 16, 16), encoder_hidden_states=context, timestep=t)
    vocab = len(clip_vocab() if family == "clip" else t5_vocab())
    ids = torch.randint(4, vocab, (1, TOKENS), generator=g)
    ids[0, -1] = 1  # the end-of-text token: CLIP pools there
    return dict(input_ids=ids)


def output(model: nn.Module, kwargs: dict) -> torch.Tensor:
    """The first output (the denoiser's prediction; CLIP's projected pooled embedding, T5's
    last hidden state)."""
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]
