"""ComfyUI 0.33 copies a model with weights of its own (multi-GPU deep clones, forced deep
copies) by running the model's loader again, as recorded in `cached_patcher_init`. A
quantized model records a recipe that loads and quantizes again (Quantize Model, Quantize
Text Encoder) or reads its file again (Load GGUF): the copy computes exactly what the
original computes and shares none of its storage. ComfyUI 0.3.75 has no such field: there
the recipe function itself is checked, and no field is added."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conftest import pack_module
from harness.tiny_models import denoise, sd3_inputs, tiny_lora, tiny_sd3_patcher, tiny_sd3_state_dict, with_lora

modules = pack_module("backends.engine.modules")
save_gguf = pack_module("backends.gguf.export").save_gguf
clone_and_quantize = load_gguf = QuantModelPatcher = None  # nodes/ needs ComfyUI: see `nodes_modules`

pytestmark = pytest.mark.usefixtures("unload_models_after_each_test", "nodes_modules")


@pytest.fixture
def nodes_modules(comfy):
    global clone_and_quantize, load_gguf, QuantModelPatcher
    clone_and_quantize = pack_module("nodes.clone_and_quantize")
    load_gguf = pack_module("nodes.load_gguf")
    QuantModelPatcher = pack_module("nodes.comfy_patcher").QuantModelPatcher


def comfy_copies_by_reloading() -> bool:
    import comfy.model_patcher
    return hasattr(comfy.model_patcher.ModelPatcher, "deepclone_multigpu")


def payload_storages(patcher) -> set:
    return {p.untyped_storage().data_ptr() for m in patcher.model.diffusion_model.modules()
            if isinstance(m, modules.QuantizedLayer) for name, p in m.named_parameters() if name != "bias"}


def assert_independent_equal_copy(copy, original, inputs):
    assert isinstance(copy, QuantModelPatcher)
    assert copy.model is not original.model
    assert payload_storages(copy) and not payload_storages(copy) & payload_storages(original)
    assert torch.equal(denoise(copy, inputs), denoise(original, inputs))


@pytest.fixture
def diffusion_file(base_dir):
    folder = base_dir / "models" / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "qk_reload_tiny_sd3.safetensors"
    save_file(tiny_sd3_state_dict(), str(path))
    yield path
    path.unlink()


def test_quantized_model_copied_by_reloading_keeps_a_baked_lora(comfy, diffusion_file):
    """A MODEL from ComfyUI's diffusion-model loader, with a LoRA baked into its quantized
    layers: ComfyUI's deep copy (0.33), or the recipe called as ComfyUI calls it (0.3.75),
    gives an independent model with the same output. Shown able to fail: requantized_patcher
    not restoring the source's patches -> the copy lacks the LoRA and its output differs;
    quantize_patcher not recording the recipe -> deepclone_multigpu raises RuntimeError
    ("cached_patcher_init is not initialized")."""
    import comfy.sd as comfy_sd
    source = comfy_sd.load_diffusion_model(str(diffusion_file))
    lora, _ = tiny_lora(source)
    patched = with_lora(source, lora)
    node = comfy.NODE_CLASS_MAPPINGS["QuantKitQuantizeModel"]()
    quantized = node.quantize(patched, "gguf:Q8_0", "auto")["result"][0]
    inputs = sd3_inputs()
    if comfy_copies_by_reloading():
        assert quantized.cached_patcher_init[0] is clone_and_quantize.requantized_patcher
        copy = quantized.deepclone_multigpu(new_load_device=quantized.load_device)
        assert_independent_equal_copy(copy, quantized, inputs)
        forced = quantized.clone(force_deepcopy=True)  # the loader is called with disable_dynamic=True
        assert_independent_equal_copy(forced, quantized, inputs)
    else:
        assert not hasattr(quantized, "cached_patcher_init")
        fresh = clone_and_quantize.requantized_patcher(
            (comfy_sd.load_diffusion_model, (str(diffusion_file),)), patched.patches,
            [("diffusion_model", "sd3", "diffusion model")], "gguf:Q8_0", "", "auto")
        copy = quantized.clone()
        copy.model = fresh.model  # what ComfyUI 0.33's deep copy does with the recipe's model
        assert_independent_equal_copy(copy, quantized, inputs)


def test_a_source_without_a_recipe_gives_none(comfy):
    """A MODEL built from a state dict in memory (no loader to run again) gets no recipe, so
    ComfyUI says the loader does not support copies rather than reloading something else.
    Shown able to fail: recording a recipe whatever the source -> cached_patcher_init is a
    tuple whose loader is None and calling it would raise TypeError."""
    node = comfy.NODE_CLASS_MAPPINGS["QuantKitQuantizeModel"]()
    quantized = node.quantize(tiny_sd3_patcher(), "torchao:int8wo", "auto")["result"][0]
    assert getattr(quantized, "cached_patcher_init", None) is None


def test_load_gguf_model_copied_by_reading_the_file_again(comfy, base_dir):
    """Shown able to fail: load_gguf_model not recording reloaded_gguf_model -> on 0.33
    deepclone_multigpu raises RuntimeError; reloaded_gguf_model returning the report instead
    of the patcher -> AttributeError."""
    folder = base_dir / "models" / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "qk_reload_tiny_sd3_Q4_0.gguf"
    node = comfy.NODE_CLASS_MAPPINGS["QuantKitQuantizeModel"]()
    save_gguf(node.quantize(tiny_sd3_patcher(), "gguf:Q4_0", "auto")["result"][0].model.diffusion_model,
              path, "sd3", {"general.name": path.stem})
    try:
        loaded, _ = load_gguf.load_gguf_model(str(path))
        inputs = sd3_inputs()
        if comfy_copies_by_reloading():
            assert loaded.cached_patcher_init == (load_gguf.reloaded_gguf_model, (str(path),))
            copy = loaded.deepclone_multigpu(new_load_device=loaded.load_device)
        else:
            assert not hasattr(loaded, "cached_patcher_init")
            copy = loaded.clone()
            copy.model = load_gguf.reloaded_gguf_model(str(path)).model
        assert_independent_equal_copy(copy, loaded, inputs)
    finally:
        path.unlink()


def test_quantized_text_encoder_copied_by_reloading(comfy):
    """CLIP-L from ComfyUI's CLIP loader through Quantize Text Encoder: the copy encodes as
    the original does. Shown able to fail: quantize_patcher not recording the recipe -> on
    0.33 deepclone_multigpu raises RuntimeError ("cached_patcher_init is not initialized")."""
    from harness.standin_clips import PROMPTS, encode, load_family_clip
    clip = load_family_clip("sd15")
    node = comfy.NODE_CLASS_MAPPINGS["QuantKitQuantizeTextEncoder"]()
    quantized = node.quantize(clip, "torchao:int8wo", "auto")["result"][0]
    if comfy_copies_by_reloading():
        patcher = quantized.patcher.deepclone_multigpu(new_load_device=quantized.patcher.load_device)
    else:
        assert not hasattr(quantized.patcher, "cached_patcher_init")
        patcher = clone_and_quantize.requantized_patcher(
            (lambda: load_family_clip("sd15").patcher, ()), clip.patcher.patches,
            [("clip_l", "clip_l", "clip_l")], "torchao:int8wo", "", "auto")
    copy = quantized.clone()
    copy.patcher, copy.cond_stage_model = patcher, patcher.model
    assert isinstance(patcher, QuantModelPatcher) and patcher.model is not quantized.patcher.model
    assert torch.equal(encode(copy, PROMPTS[0])[0], encode(quantized, PROMPTS[0])[0])
