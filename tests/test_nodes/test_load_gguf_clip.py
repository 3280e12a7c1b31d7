"""Load GGUF CLIP through real ComfyUI on text-encoder files written with gguf-py alone
(not QuantKit's writer): CLIP-L in ComfyUI's names beside a CLIP-G .safetensors (SDXL),
and the stand-in T5-XXL in llama.cpp's names (PixArt). Expected values: gguf-py's decoding
of the same bytes, ComfyUI's own loader on the CLIP source files, and the T5 source tensors.

How to see these fail: swap "ffn_gate" and "ffn_up" in backends/gguf_names.T5_BLOCK (the
T5 weights land under the wrong names), or drop EMBEDDING_NAMES (a quantized embedding
fails to load).
"""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from conftest import pack_module
from harness.gguf_files import llama_cpp_t5_name, safetensors_items, write_file
from harness.standin_clips import PROMPTS, encode, load_family_clip, te_path
from harness.tolerances import weight_error_band

import gguf
from gguf.quants import dequantize as np_dequantize

pytestmark = pytest.mark.usefixtures("unload_models_after_each_test")
modules = pack_module("backends.engine.modules")
registry = pack_module("backends.engine.registry")
Q8_0 = gguf.GGMLQuantizationType.Q8_0


@pytest.fixture(scope="module")
def te_folder(base_dir):
    folder = base_dir / "models" / "text_encoders"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def load(comfy, *files, type="sd3"):
    node = comfy.NODE_CLASS_MAPPINGS["QuantKitLoadGGUFCLIP"]
    listed = node.INPUT_TYPES()["required"]["clip_name1"][0]
    assert all(f in listed for f in files), "the files are listed"
    out = node().load(files[0], type, *files[1:])
    return out["result"][0], out["ui"]["text"][0]


def cosine(a, b):
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_clip_l_gguf_with_clip_g_safetensors_for_sdxl(comfy, te_folder):
    """Shown able to fail: load_gguf_clip in nodes/load_gguf_clip.py reading only the first
    file (`paths[:1]`) -> no CLIP-G: the conditioning is [1, 77, 768], not [1, 77, 2048]."""
    import shutil
    quantized = lambda key, t: ".mlp." in key or "self_attn" in key  # noqa: E731
    source = lambda: safetensors_items(te_path("qk_clip_l.safetensors"))  # noqa: E731
    picked = write_file(te_folder / "clip_l_q8.gguf", source, "clip", quantized,
                    keep={k for k, t in source() if t.dim() == 2 and quantized(k, t)})
    shutil.copy(te_path("qk_clip_g.safetensors"), te_folder / "clip_g.safetensors")
    clip, text = load(comfy, "clip_l_q8.gguf", "clip_g.safetensors", type="sdxl")
    assert "layers quantized" in text and "Q8_0" in text
    layers = {n.removeprefix("transformer.") + ".weight": m
              for n, m in clip.cond_stage_model.clip_l.named_modules() if isinstance(m, modules.QuantizedLayer)}
    assert set(layers) == set(picked)
    for key, data in picked.items():
        want = torch.from_numpy(np_dequantize(data, Q8_0))
        assert torch.equal(layers[key].dequantized_weight(torch.float32), want), key
    reference = load_family_clip("sdxl")
    for prompt in PROMPTS:
        (ours, ours_pooled), (ref, ref_pooled) = encode(clip, prompt), encode(reference, prompt)
        assert ours.shape == ref.shape and cosine(ours, ref) > 0.995
        assert cosine(ours_pooled, ref_pooled) > 0.995


@pytest.mark.slow
@pytest.mark.both_versions
def test_t5_in_llama_cpp_names_for_pixart(comfy, te_folder):
    """The 4.7 B-parameter stand-in T5 as a Q8_0 file with llama.cpp's tensor names
    (token embedding quantized too, as llama.cpp writes it).
    Shown able to fail (reasoned, slow test): "ffn_gate" and "ffn_up" swapped in
    backends/gguf/names.T5_BLOCK -> wi_0 holds ffn_up's bytes (the torch.equal against
    gguf-py's decoding of ffn_gate fails); with EMBEDDING_NAMES matching nothing, the
    Q8_0 token embedding reaches T5's nn.Embedding as a meta placeholder, not decoded
    values, and loading or encoding fails."""
    source = lambda: ((llama_cpp_t5_name(k), t)  # noqa: E731
                      for k, t in safetensors_items(te_path("qk_t5xxl_fp8.safetensors")))
    picked = write_file(te_folder / "t5_llama_q8.gguf", source, "t5encoder", lambda key, t: True,
                        keep={"token_embd.weight", "enc.blk.0.ffn_gate.weight"})
    assert set(picked) == {"token_embd.weight", "enc.blk.0.ffn_gate.weight"}
    clip, text = load(comfy, "t5_llama_q8.gguf", type="pixart")
    assert "Q8_0" in text
    t5 = clip.cond_stage_model.t5xxl.transformer
    wi_0 = t5.encoder.block[0].layer[1].DenseReluDense.wi_0
    assert isinstance(wi_0, modules.QuantizedLayer)
    assert torch.equal(wi_0.dequantized_weight(torch.float32),
                       torch.from_numpy(np_dequantize(picked["enc.blk.0.ffn_gate.weight"], Q8_0)))
    # every tensor landed under its ComfyUI name: each loaded weight is its source within
    # Q8_0 rounding (another tensor of the same shape would be ~140 % off): the format's band
    # on the stand-in's Gaussian weights
    bound = weight_error_band("gguf:Q8_0", registry.get_format("gguf:Q8_0")[1].bits_per_weight)[1]
    loaded = t5.state_dict()
    worst = 0.0
    for key, tensor in safetensors_items(te_path("qk_t5xxl_fp8.safetensors")):
        layer = t5.get_submodule(key.rpartition(".")[0])
        got = layer.dequantized_weight(torch.float32) if isinstance(layer, modules.QuantizedLayer) else loaded[key].float()
        want = tensor.float()
        err = ((got - want).norm() / want.norm()).item()
        worst = max(worst, err)
        assert err < bound, (key, err, bound)
    print(f"worst tensor: relative error {worst:.5f} (bound {bound:.5f})")
    conds = [encode(clip, p)[0] for p in PROMPTS]
    assert all(torch.isfinite(c).all() for c in conds) and cosine(conds[0], conds[1]) < 0.98
    import comfy.model_management
    comfy.model_management.unload_all_models()
    del clip, t5, loaded
    gc.collect()
    (te_folder / "t5_llama_q8.gguf").unlink()


@pytest.mark.slow
def test_sd3_triple_with_t5_in_comfyui_names(comfy, te_folder):
    """CLIP-L, CLIP-G and T5-XXL .gguf files in ComfyUI's names (as ComfyUI-GGUF's
    converter writes them), combined for SD3.
    Shown able to fail (reasoned, slow test): load_gguf_clip reading only the first two
    files -> no t5xxl encoder (the getattr check fails) and the conditioning is 2048 wide,
    not 4096; a wrong-layer swap in swap_in_quantized breaks the torch.equal on wo."""
    big = lambda key, t: t.numel() >= 1 << 20  # noqa: E731
    for name, source in (("l", "qk_clip_l.safetensors"), ("g", "qk_clip_g.safetensors")):
        write_file(te_folder / f"sd3_clip_{name}.gguf", lambda s=source: safetensors_items(te_path(s)), "clip", big)
    picked = write_file(te_folder / "t5_comfy_q8.gguf", lambda: safetensors_items(te_path("qk_t5xxl_fp8.safetensors")),
                        "t5", big, keep={"encoder.block.3.layer.1.DenseReluDense.wo.weight"})
    clip, text = load(comfy, "sd3_clip_l.gguf", "sd3_clip_g.gguf", "t5_comfy_q8.gguf", type="sd3")
    model = clip.cond_stage_model
    assert all(getattr(model, e, None) is not None for e in ("clip_l", "clip_g", "t5xxl"))
    wo = model.t5xxl.transformer.encoder.block[3].layer[1].DenseReluDense.wo
    assert torch.equal(wo.dequantized_weight(torch.float32),
                       torch.from_numpy(np_dequantize(picked["encoder.block.3.layer.1.DenseReluDense.wo.weight"], Q8_0)))
    for encoder in ("clip_l", "clip_g", "t5xxl"):
        assert any(isinstance(m, modules.QuantizedLayer) for m in getattr(model, encoder).modules()), encoder
    cond, pooled = encode(clip, PROMPTS[0])
    assert cond.shape[-1] == 4096 and pooled.shape[-1] == 768 + 1280
    assert torch.isfinite(cond).all() and torch.isfinite(pooled).all()
    import comfy.model_management
    comfy.model_management.unload_all_models()
    del clip, model, wo
    gc.collect()
    (te_folder / "t5_comfy_q8.gguf").unlink()
