"""Quantize Text Encoder through real ComfyUI on the stand-in CLIP-L, CLIP-G and T5-XXL
(full size, random weights), loaded by ComfyUI's own CLIP loaders."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from conftest import pack_module
from harness.draws import rel_err
from harness.formats import cpu_format_ids
from harness.noise_reference import noise_floor_error, output_error_band, recipe_checked_layers
from harness.standin_clips import PROMPTS, encode, load_family_clip
from harness.state_hash import state_digest

registry = pack_module("backends.engine.registry")
base = pack_module("backends.engine.base")
errors = pack_module("backends.engine.errors")
modules = pack_module("backends.engine.modules")

CPU_FORMATS = cpu_format_ids(registry, base.hardware_problem)

pytestmark = pytest.mark.usefixtures("unload_models_after_each_test")

# Minimum cosine similarity of the conditioning vs the unquantized encoder, by bits stored.
# T5-XXL is 24 layers deep (CLIP-L 12): errors compound, so its floor is lower. At 4 bits the
# random stand-in T5 keeps only ~0.6 cosine (NF4): use 8-bit formats for T5 (README says so).
def min_cosine(bits: float, deep: bool = False) -> float:
    table = ((7.9, 0.99), (5.9, 0.97), (4.9, 0.9), (3.9, 0.5), (2.9, 0.3)) if deep else \
        ((7.9, 0.995), (5.9, 0.98), (4.9, 0.95), (3.9, 0.85), (2.9, 0.7))
    for limit, bound in table:
        if bits >= limit:
            return bound
    return 0.4


def cosine(a, b):
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def quantize(comfy, clip, fmt, encoders="auto"):
    out = comfy.NODE_CLASS_MAPPINGS["QuantKitQuantizeTextEncoder"]().quantize(clip, fmt, encoders)
    return out["result"][0], out["ui"]["text"][0]


def snapshot(clip):
    return state_digest(clip)


def assert_unchanged(clip, snap):
    import comfy.model_management as mm
    mm.unload_all_models()
    assert state_digest(clip) == snap, "an upstream tensor changed"
    assert not any(isinstance(m, modules.QuantizedLayer) for m in clip.cond_stage_model.modules())


def quantized_encoders(clip):
    found = set()
    for name, m in clip.cond_stage_model.named_modules():
        if isinstance(m, modules.QuantizedLayer):
            found.add(name.split(".")[0])
    return found


@pytest.fixture(scope="module")
def sd15(comfy):
    clip = load_family_clip("sd15")
    return clip, [encode(clip, PROMPTS[0])], snapshot(clip)


@pytest.mark.parametrize("fmt", CPU_FORMATS, ids=CPU_FORMATS)
def test_sd15_clip_l_every_format(comfy, sd15, fmt):
    """Shown able to fail: QuantizeTextEncoder.quantize not setting the new CLIP's
    cond_stage_model -> no quantized encoder (set() == {'clip_l'} fails); gguf:Q8_0's spec
    claiming 4.5 bits (backends/gguf/adapter.py) -> its error 0.017 is below the band
    0.126-0.402 of what it claims; a layer left unquantized -> "layers not as recipe
    'clip_l' says" (recipe_checked_layers, shown in test_quantize_model); quantize_tree
    recording a quantized layer's source_bytes without its bias -> model_size 167121412, not
    247300612 - 80013312 (gguf:Q8_0)."""
    clip, reference, snap = sd15
    new, text = quantize(comfy, clip, fmt)
    assert quantized_encoders(new) == {"clip_l"}
    bits = registry.get_format(fmt)[1].bits_per_weight
    (cond, pooled), (ref_cond, ref_pooled) = encode(new, PROMPTS[0]), reference[0]
    fresh = load_family_clip("sd15")  # the float noise reference (tests/harness/noise_reference.py)
    layers = recipe_checked_layers(new.cond_stage_model, fresh.cond_stage_model.clip_l, fmt, "clip_l",
                                   prefix="clip_l.")
    floor = noise_floor_error(fresh.cond_stage_model, layers,
                              lambda: encode(fresh, PROMPTS[0])[0], ref_cond)
    low, high = output_error_band(floor)
    err = rel_err(cond, ref_cond)
    print(f"{fmt}: relative error {err:.5f}, float noise floor {floor:.5f}, ratio {err / floor:.2f}, "
          f"cosine {cosine(cond, ref_cond):.5f}")
    assert low <= err <= high, f"{fmt}: conditioning error {err:.5f} outside its band {low:.5f}-{high:.5f}"
    assert cosine(pooled, ref_pooled) >= min_cosine(bits) - 0.02
    # ComfyUI's memory manager sees the true size: the source less what the reports say
    # was saved against the source's own dtype.
    layers = [m for m in new.cond_stage_model.modules() if isinstance(m, modules.QuantizedLayer)]
    saved = sum(r.bytes_before - r.bytes_after for r in new.cond_stage_model.quantkit_reports)
    assert new.patcher.model_size() == clip.patcher.model_size() - saved
    assert saved > 0.4 * sum(l.weight_shape.numel() * 2 for l in layers) * (1 - bits / 16) / 0.5
    assert new.tokenizer is clip.tokenizer
    assert_unchanged(clip, snap)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchao:int8wo", "bnb:nf4", "quanto:int8", "gguf:Q8_0"])
def test_sdxl_auto_keeps_clip_g_and_all_quantizes_it(comfy, fmt):
    """Shown able to fail (reasoned, slow test): choose_encoders in
    nodes/quantize_text_encoder.py not leaving out clip_g for 'auto' -> auto quantizes
    {'clip_l', 'clip_g'} and the first assertion fails; 'all' then equals 'auto' in size."""
    clip = load_family_clip("sdxl")
    ref = encode(clip, PROMPTS[0])
    snap = snapshot(clip)
    auto, _ = quantize(comfy, clip, fmt, "auto")
    assert quantized_encoders(auto) == {"clip_l"}, "CLIP-G stays in high precision by default"
    everything, _ = quantize(comfy, clip, fmt, "all")
    assert quantized_encoders(everything) == {"clip_l", "clip_g"}
    bits = registry.get_format(fmt)[1].bits_per_weight
    for new in (auto, everything):
        cond, pooled = encode(new, PROMPTS[0])
        print(f"sdxl {fmt}: cosine {cosine(cond, ref[0]):.5f}, pooled {cosine(pooled, ref[1]):.5f}")
        assert cosine(cond, ref[0]) >= min_cosine(bits)
    assert everything.patcher.model_size() < auto.patcher.model_size() < clip.patcher.model_size()
    assert_unchanged(clip, snap)


@pytest.mark.slow
@pytest.mark.both_versions
def test_sd3_auto_quantizes_t5_and_clip_l_not_clip_g(comfy):
    """Shown able to fail (reasoned, slow test): choose_encoders returning all encoders for
    'auto' -> {'clip_l', 'clip_g', 't5xxl'} != {'clip_l', 't5xxl'}; its "holds only"
    message naming the wanted encoders instead of the present ones breaks the regex."""
    clip = load_family_clip("sd3")
    ref_cond, ref_pooled = encode(clip, PROMPTS[0])
    new, text = quantize(comfy, clip, "torchao:int8wo")
    assert quantized_encoders(new) == {"clip_l", "t5xxl"}
    assert "clip_g" not in text
    cond, pooled = encode(new, PROMPTS[0])
    print(f"sd3 auto: cosine {cosine(cond, ref_cond):.5f}, pooled {cosine(pooled, ref_pooled):.5f}")
    assert cosine(cond, ref_cond) >= min_cosine(8, deep=True) and cosine(pooled, ref_pooled) >= 0.995
    with pytest.raises(errors.QuantKitError, match=r"t5xxl, but this CLIP holds only clip_l\."):
        quantize(comfy, load_family_clip("sd15"), "torchao:int8wo", "t5xxl")


def test_asking_for_a_missing_encoder_is_an_error(comfy, sd15):
    """Shown able to fail: choose_encoders in nodes/quantize_text_encoder.py not raising
    for missing encoders -> AttributeError (SD1ClipModel has no attribute clip_g)."""
    with pytest.raises(errors.QuantKitError, match="holds only clip_l"):
        quantize(comfy, sd15[0], "torchao:int8wo", "clip_g")


def test_unknown_clip_type_is_an_error(comfy, sd15):
    """Shown able to fail: present_encoders not raising when it finds none -> the 'auto'
    error about CLIP-G comes instead and the regex "holds no encoder" does not match."""
    clip = sd15[0].clone()
    clip.cond_stage_model = torch.nn.Module()  # a CLIP from some other model family
    with pytest.raises(errors.QuantKitError, match="holds no encoder"):
        quantize(comfy, clip, "torchao:int8wo")


def test_encoders_menu_is_what_saved_workflows_store(comfy):
    """The menu keeps its values and their order; each value names text-encoder recipes, and
    Save Quantized Model knows a GGUF architecture for every encoder.
    Shown able to fail: _TEXT_ENCODERS in engine/recipes.py listing t5xxl first -> the menu
    reads [..., 'clip_g', 't5xxl', 'clip_l', ...]; ENCODER_ARCH in nodes/save_quantized_model.py
    without "clip_g" -> {'clip_l', 't5xxl'} != the three encoders."""
    cls = type(comfy.NODE_CLASS_MAPPINGS["QuantKitQuantizeTextEncoder"]())
    menu = cls.INPUT_TYPES()["required"]["encoders"][0]
    assert menu == ["auto", "all", "t5xxl", "clip_l", "clip_g", "clip_l+t5xxl", "clip_l+clip_g",
                    "clip_g+t5xxl"]
    encoders = pack_module("backends.engine.recipes").TEXT_ENCODERS
    assert all(set(choice.split("+")) <= set(encoders) for choice in menu[2:])
    assert set(pack_module("nodes.save_quantized_model").ENCODER_ARCH) == set(encoders)


def comfy_clips():
    """{family: (ComfyUI's text-encoder wrapper for it, built full size on the meta device,
    the encoders Quantize Text Encoder quantizes, the ones it leaves)}: the classes ComfyUI's
    CLIP loaders instantiate (comfy/sd.py), both versions."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    from comfy.text_encoders import (ace, aura_t5, flux, hidream, hydit, lumina2, pixart_t5, sa_t5,
                                     sd2_clip, sd3_clip, wan)
    from bench.standins.components import META, meta_build
    table = {
        "SD1.5": (comfy.sd1_clip.SD1ClipModel, ["clip_l"], []),
        "SDXL": (comfy.sdxl_clip.SDXLClipModel, ["clip_l", "clip_g"], []),
        "SD2": (sd2_clip.SD2ClipModel, ["clip_h"], []),
        "SD3": (sd3_clip.sd3_clip(), ["clip_l", "clip_g", "t5xxl"], []),
        "PixArt": (pixart_t5.pixart_te(), ["t5xxl"], []),
        "Flux": (flux.flux_clip(), ["clip_l", "t5xxl"], []),
        "AuraFlow": (aura_t5.AuraT5Model, ["pile_t5xl"], []),
        "Wan": (wan.te(), ["umt5xxl"], []),
        "Stable Audio": (sa_t5.SAT5Model, ["t5base"], []),
        "ACE-Step": (ace.AceT5Model, ["umt5base"], []),
        "Hunyuan-DiT": (hydit.HyditModel, ["mt5xl"], ["hydit_clip"]),
        "HiDream": (hidream.hidream_clip(), ["clip_l", "clip_g", "t5xxl"], ["llama"]),
        "Lumina 2": (lumina2.te(), [], ["gemma2_2b"]),
    }
    out = {}
    for family, (cls, known, others) in table.items():
        with meta_build():
            out[family] = (cls(device=META, dtype=torch.float16), known, others)
    return out


def test_encoders_found_in_every_clip_comfyui_builds(comfy):
    """Every CLIP-L/G/H and T5-family encoder of ComfyUI's wrappers is found under its name;
    other encoders are named as left alone; a CLIP holding none is a clear error.
    Shown able to fail: ENCODER_NETWORKS in nodes/quantize_text_encoder.py without T5 ->
    SD3 finds (['clip_l', 'clip_g'], ['t5xxl']); Recipe("pile_t5xl") left out of
    engine/recipes.py -> AuraFlow's CLIP raises "holds no encoder ... (it holds pile_t5xl)"."""
    from types import SimpleNamespace
    node = pack_module("nodes.quantize_text_encoder")
    for family, (model, known, others) in comfy_clips().items():
        clip = SimpleNamespace(cond_stage_model=model)
        if not known:
            with pytest.raises(errors.QuantKitError, match=rf"holds no encoder Quantize Text Encoder knows "
                                                           rf"\(it holds {others[0]}\)\..*Connect this CLIP"):
                node.QuantizeTextEncoder().quantize(clip, "torchao:int8wo", "auto")
            continue
        assert node.present_encoders(clip) == (known, others), family


def test_text_encoder_recipes_name_only_quantizable_layers(comfy):
    r"""Every text-encoder recipe is an encoder some ComfyUI CLIP holds, and each of its
    patterns matches a Linear or Conv layer of that encoder: one that matches only embeddings
    or layer norms (never quantized) is dead.
    Shown able to fail: clip_l's recipe given keep=(r"embeddings\.",) again -> "clip_l:
    'embeddings\\.' matches no Linear or Conv layer"; t5xxl's given final_projection=
    (r"(^|\.)final_layer_norm$",) again -> the same for t5xxl; a recipe "t5xl" added ->
    "t5xl: no ComfyUI CLIP holds it"."""
    recipes = pack_module("backends.engine.recipes")
    quantizable = pack_module("backends.engine.quantize").QUANTIZABLE
    holders = {name: getattr(model, name) for model, known, _ in comfy_clips().values() for name in known}
    for name in recipes.TEXT_ENCODERS:
        assert name in holders, f"{name}: no ComfyUI CLIP holds it"
        layers = [n for n, m in holders[name].transformer.named_modules(prefix="transformer")
                  if isinstance(m, quantizable)]
        recipe = recipes.get_recipe(name)
        for pattern in recipe.keep + recipe.final_projection:
            assert any(re.search(pattern, layer) for layer in layers), \
                f"{name}: {pattern!r} matches no Linear or Conv layer"


@pytest.mark.slow
def test_quantized_clip_with_sdxl_and_sd3_encode_nodes(comfy):
    """The output CLIP plugs into ComfyUI's family-specific encode nodes.
    Shown able to fail (reasoned, slow test): Q8_0 decoding with a wrong block scale in
    backends/gguf/dequant.py, or torchao:int8wo's per-row scale applied per column, takes
    the conditioning far below cosine 0.99."""
    from comfy.sd import CLIPType, load_clip
    from harness.standin_clips import te_path
    text = PROMPTS[0]
    sdxl = load_family_clip("sdxl")
    q_sdxl, _ = quantize(comfy, sdxl, "gguf:Q8_0", "all")
    node = comfy.NODE_CLASS_MAPPINGS["CLIPTextEncodeSDXL"]
    args = dict(width=1024, height=1024, crop_w=0, crop_h=0, target_width=1024, target_height=1024,
                text_g=text, text_l=text)
    call = getattr(node, "execute", None) or node().encode
    ref, out = call(clip=sdxl, **args), call(clip=q_sdxl, **args)
    ref, out = (r[0] if isinstance(r, tuple) else r.result[0] for r in (ref, out))
    assert cosine(out[0][0], ref[0][0]) > 0.99
    assert cosine(out[0][1]["pooled_output"], ref[0][1]["pooled_output"]) > 0.99

    sd3 = load_clip([te_path("qk_clip_l.safetensors"), te_path("qk_clip_g.safetensors")],
                    clip_type=CLIPType.SD3)  # no T5: ComfyUI fills zeros
    q_sd3, _ = quantize(comfy, sd3, "torchao:int8wo", "clip_l+clip_g")
    node = comfy.NODE_CLASS_MAPPINGS["CLIPTextEncodeSD3"]
    call = getattr(node, "execute", None) or node().encode
    args = dict(clip_l=text, clip_g=text, t5xxl=text, empty_padding="none")
    ref, out = call(clip=sd3, **args), call(clip=q_sd3, **args)
    ref, out = (r[0] if isinstance(r, tuple) else r.result[0] for r in (ref, out))
    assert out[0][0].shape == ref[0][0].shape
    assert cosine(out[0][0], ref[0][0]) > 0.99


@pytest.mark.slow
@pytest.mark.both_versions
def test_auraflow_pile_t5xl(comfy):
    """AuraFlow's own encoder (Pile-T5-XL, UMT5-style: a relative-attention table in every
    block), loaded from the AuraFlow checkpoint: 'auto' quantizes it, its conditioning stays
    close, and its Linear weights (all but the embedding table) take 8 bits instead of 16.
    Shown able to fail: Recipe("pile_t5xl") left out of engine/recipes.py -> "holds no
    encoder Quantize Text Encoder knows (it holds pile_t5xl)"."""
    clip = load_family_clip("auraflow")
    ref, _ = encode(clip, PROMPTS[0])
    digest = state_digest(clip)
    new, text = quantize(comfy, clip, "torchao:int8wo")
    assert quantized_encoders(new) == {"pile_t5xl"} and text.startswith("pile_t5xl: torchao:int8wo")
    cond, _ = encode(new, PROMPTS[0])
    before, after = clip.patcher.model_size(), new.patcher.model_size()
    t5 = clip.cond_stage_model.pile_t5xl.transformer
    linear = sum(m.weight.numel() for m in t5.modules() if isinstance(m, torch.nn.Linear))
    rows = sum(m.weight.shape[0] for m in t5.modules() if isinstance(m, torch.nn.Linear))
    print(f"auraflow pile_t5xl int8wo: cosine {cosine(cond, ref):.5f}, rel {rel_err(cond, ref):.4f}; "
          f"{before / 2**30:.2f} GiB -> {after / 2**30:.2f} GiB")
    assert torch.isfinite(cond).all() and cosine(cond, ref) >= min_cosine(8, deep=True)
    # every Linear weight from 2 bytes to 1, plus one scale of at most 4 bytes per output row
    # (one 2048 x 2048 layer left in 16 bits would add 4 MiB, twice what all scales take)
    assert 0 < after - (before - linear) <= 4 * rows
    assert state_digest(clip) == digest


# Last in the module: the full T5-XXL fixture then never sits beside the other tests' encoders.
@pytest.fixture(scope="module")
def t5_clip(comfy):
    clip = load_family_clip("pixart")
    return clip, encode(clip, PROMPTS[0]), state_digest(clip)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchao:int8wo", "bnb:nf4", "quanto:int8", "gguf:Q8_0"])
def test_pixart_t5xxl(comfy, t5_clip, fmt):
    """Shown able to fail (reasoned, slow test): clone_tree (backends/engine/clone.py)
    sharing the source's modules instead of copying them -> the input CLIP holds
    QuantizedLayers and its digest changes; a recipe keeping T5's Linear layers in fp16
    -> model_size() is about 2x `before * bits / 8`."""
    clip, (ref_cond, _), t5_digest = t5_clip
    before = clip.patcher.model_size()
    new, text = quantize(comfy, clip, fmt, "t5xxl")
    assert quantized_encoders(new) == {"t5xxl"}
    cond, _ = encode(new, PROMPTS[0])
    bits = registry.get_format(fmt)[1].bits_per_weight
    print(f"pixart t5xxl {fmt}: cosine {cosine(cond, ref_cond):.5f}, rel {rel_err(cond, ref_cond):.4f}; "
          f"{before / 2**30:.2f} GiB -> {new.patcher.model_size() / 2**30:.2f} GiB")
    assert torch.isfinite(cond).all()
    assert cosine(cond, ref_cond) >= min_cosine(bits, deep=True)
    assert new.patcher.model_size() <= before * (bits / 8) * 1.07  # stored fp8 -> bits
    assert state_digest(clip) == t5_digest, "the input CLIP's weights are untouched"
    assert not any(isinstance(m, modules.QuantizedLayer) for m in clip.cond_stage_model.modules())
