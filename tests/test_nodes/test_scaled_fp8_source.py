"""A source model stored in ComfyUI's scaled fp8 (a float8 weight and a per-layer
`scale_weight`: the `*_fp8_scaled` files, Flux's T5-XXL among them) is quantized from its
true values, weight x scale, as ComfyUI's own layer converts it: on ComfyUI 0.3.75
(`scaled_fp8_ops`) and on 0.33 (converted on load to core's mixed-precision layers with a
QuantizedTensor weight). Expected values come from the file, computed in float here."""
from __future__ import annotations

import inspect

import pytest
import torch

from conftest import pack_module
from harness.draws import rel_err
from harness.noise_reference import assert_in_band, noise_floor_error, output_error_band, recipe_checked_layers
from harness.state_hash import state_digest
from harness.tiny_models import denoise, sd3_inputs, sd3_roundings, tiny_lora, tiny_sd3_state_dict, with_lora
from harness.tolerances import rounding_bound, weight_error_band

modules = pack_module("backends.engine.modules")
registry = pack_module("backends.engine.registry")
report_mod = pack_module("backends.engine.report")
errors = pack_module("backends.engine.errors")

pytestmark = pytest.mark.usefixtures("unload_models_after_each_test")

FP8 = torch.float8_e4m3fn
FORMAT = "torchao:int8wo"  # 8 bits, a scale per row
LAYER_ERROR = weight_error_band(FORMAT, registry.get_format(FORMAT)[1].bits_per_weight)[1]  # Gaussian weights
TINY_T5 = {"d_ff": 256, "d_kv": 32, "d_model": 128, "dense_act_fn": "gelu_pytorch_tanh",
           "is_gated_act": True, "layer_norm_epsilon": 1e-6, "model_type": "t5", "num_heads": 4,
           "num_layers": 2, "relative_attention_num_buckets": 32, "vocab_size": 64}


def scaled_fp8_file(state_dict: dict, skip=()) -> dict:
    """Every 2-D weight (but `skip`) as ComfyUI's scaled fp8 files store it: float8 of
    weight / scale, with scale = amax / 448 beside it; the `scaled_fp8` marker tells
    ComfyUI's loader."""
    out = {}
    for key, t in state_dict.items():
        if key.endswith(".weight") and t.dim() == 2 and key not in skip:
            scale = t.float().abs().amax() / 448.0
            out[key] = (t.float() / scale).to(FP8)
            out[key[:-len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[key] = t
    out["scaled_fp8"] = torch.empty((0,), dtype=FP8)
    return out


def true_weights(file: dict) -> dict:
    """layer name -> the float weight a scaled fp8 file stands for (float8 value x scale)."""
    return {k[:-len(".scale_weight")]: file[k[:-len("scale_weight")] + "weight"].float() * s
            for k, s in file.items() if k.endswith(".scale_weight")}


def float_file(file: dict, weights: dict) -> dict:
    """The file as a plain float one: each scaled layer's weight taken from `weights`
    (layer name -> float weight), the scales and the marker dropped."""
    return {k: weights.get(k[:-len(".weight")], v) for k, v in file.items()
            if not k.endswith("scale_weight") and k != "scaled_fp8"}


def sd3_noise_floor(quantized, file: dict, weights: dict, inputs, reference) -> float:
    """The float noise reference's output error: the float model of `weights` (float_file),
    noise on the layers FORMAT quantized in `quantized`."""
    from comfy.sd import load_diffusion_model_state_dict
    fresh = load_diffusion_model_state_dict(float_file(file, weights))
    layers = recipe_checked_layers(quantized.model, fresh.model.diffusion_model, FORMAT, "sd3",
                                   prefix="diffusion_model.")
    return noise_floor_error(fresh.model, layers, lambda: denoise(fresh, inputs), reference)


def check_layers(root, file: dict, report, source_root, report_prefix=""):
    """Every scaled layer of the file the report does not keep is quantized from its true
    weight, and the report's source bytes are what the source stored: the float8 weight, its
    float32 scale (and 0.3.75's input scale, where the loader made one), the bias."""
    truth = true_weights(file)
    records = {r.name[len(report_prefix):]: r for r in report.layers}
    assert set(truth) <= set(records), "a scaled fp8 layer was not seen as a layer"
    chosen = {n for n in truth if records[n].action != report_mod.KEPT}
    quantized = {n: m for n, m in root.named_modules() if isinstance(m, modules.QuantizedLayer)}
    assert chosen and set(quantized) == chosen
    layer_errors = {n: rel_err(quantized[n].dequantized_weight(torch.float32).cpu(), truth[n])
                    for n in chosen}
    worst = max(layer_errors, key=layer_errors.get)
    print(f"worst layer {worst}: relative error {layer_errors[worst]:.5f} (bound {LAYER_ERROR:.5f})")
    assert layer_errors[worst] < LAYER_ERROR, f"{worst} was not quantized from weight x scale"
    for name in chosen:
        source = source_root.get_submodule(name)
        bias = source.bias
        extra = 4 if getattr(source, "scale_input", None) is not None else 0
        bias_bytes = 0 if bias is None else bias.nelement() * bias.element_size()
        expected = truth[name].nelement() + 4 + extra + bias_bytes
        assert records[name].bytes_before == expected, name


@pytest.fixture
def sd3_file():
    return scaled_fp8_file(tiny_sd3_state_dict(heavy=False))


@pytest.mark.parametrize("quantize_on", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_a_scaled_fp8_model_is_quantized_from_its_true_weights(comfy, sd3_file, quantize_on):
    """Quantize Model on a scaled fp8 diffusion model: each layer's dequantized weight matches
    the file's float8 x scale, the report counts the float8 bytes and the scale, the output's
    error against the source's own lies in the band around the float noise reference of the
    true weights, and the source is unchanged.
    Shown able to fail: weight_of reading module.weight without true_weight
    (nodes/clone_and_quantize.py) -> on 0.3.75 the worst layer's error is 5.6e+03 (the raw
    float8 numbers were quantized); quantize_patcher passing no is_layer to quantize_tree ->
    on 0.33 "a scaled fp8 layer was not seen as a layer" (0 layers quantized: none is an
    nn.Linear there); quantize_tree counting source bytes as weight and bias only (as before
    the fix) -> "joint_blocks.0.context_block.mlp.fc2" (bytes_before lacks the scales)."""
    from comfy.sd import load_diffusion_model_state_dict
    patcher = load_diffusion_model_state_dict(dict(sd3_file))
    snapshot = state_digest(patcher)
    inputs = sd3_inputs()
    reference = denoise(patcher, inputs)
    out = comfy.NODE_CLASS_MAPPINGS["QuantKitQuantizeModel"]().quantize(patcher, FORMAT, "auto",
                                                                         quantize_on=quantize_on)
    quantized = out["result"][0]
    report = quantized.model.quantkit_reports[-1]
    print(out["ui"]["text"][0])
    check_layers(quantized.model.diffusion_model, sd3_file, report, patcher.model.diffusion_model)
    err = rel_err(denoise(quantized, inputs), reference)
    # the float noise reference: the float model of the file's true weights
    floor = sd3_noise_floor(quantized, sd3_file, true_weights(sd3_file), inputs, reference)
    low, high = output_error_band(floor)
    print(f"scaled fp8 source -> {FORMAT}: output relative error {err:.5f} (band {low:.5f}-{high:.5f})")
    assert_in_band(f"scaled fp8 source -> {FORMAT}", err, floor)
    import comfy.model_management as mm
    mm.unload_all_models()
    assert state_digest(patcher) == snapshot, "the source model changed"


def test_a_lora_on_a_scaled_fp8_model_is_baked_into_the_true_weights(comfy, sd3_file):
    """A LoRA loaded on the scaled fp8 source (ComfyUI patched the float8 weights in place,
    keeping the originals as backups) is baked into weight x scale: each LoRA layer's
    dequantized weight matches the file's float8 x scale + up @ down, computed here, and the
    output's error against the float model of the true weights with the LoRA lies in the band
    around the float noise reference of the merged weights.
    Shown able to fail: weight_of reading module.weight without true_weight -> on 0.3.75
    "joint_blocks.0.x_block.attn.qkv: LoRA not baked into weight x scale" (error 119.5)."""
    with torch.inference_mode():  # all of it, as ComfyUI runs its nodes
        _lora_on_scaled_fp8(comfy, sd3_file)


def _lora_on_scaled_fp8(comfy, sd3_file):
    from comfy.sd import load_diffusion_model_state_dict
    patcher = load_diffusion_model_state_dict(dict(sd3_file))
    lora, targets = tiny_lora(patcher, heavy=False)
    source = with_lora(patcher, lora)
    inputs = sd3_inputs()
    fp8_run = denoise(source, inputs)  # loads it: the patches are applied, backups kept
    quantized = comfy.NODE_CLASS_MAPPINGS["QuantKitQuantizeModel"]().quantize(
        source, FORMAT, "auto")["result"][0]
    truth = true_weights(sd3_file)
    merged = dict(truth)
    for key in targets:
        name = key[len("diffusion_model."):]
        up, down = lora[f"{key}.lora_up.weight"].float(), lora[f"{key}.lora_down.weight"].float()
        merged[name] = truth[name] + up @ down
        layer = quantized.model.diffusion_model.get_submodule(name)
        err = rel_err(layer.dequantized_weight(torch.float32).cpu(), merged[name])
        print(f"{name}: relative error {err:.5f} (bound {LAYER_ERROR:.5f})")
        assert err < LAYER_ERROR, f"{name}: LoRA not baked into weight x scale"
    # ComfyUI's own run of the LoRA'd source rounds the patched weights back to float8 (0.3.75:
    # under the old scale, clipping them): the float model of the true weights is the reference
    reference = denoise(with_lora(load_diffusion_model_state_dict(float_file(sd3_file, truth)), lora), inputs)
    err = rel_err(denoise(quantized, inputs), reference)
    # its float noise reference: noise relative to the merged weights, which the quantizer saw
    floor = sd3_noise_floor(quantized, sd3_file, merged, inputs, reference)
    low, high = output_error_band(floor)
    print(f"scaled fp8 source + LoRA -> {FORMAT}: output relative error {err:.5f} (band {low:.5f}-{high:.5f}; "
          f"ComfyUI's own float8 run: {rel_err(fp8_run, reference):.4f})")
    assert_in_band(f"scaled fp8 source + LoRA -> {FORMAT}", err, floor)


def tiny_t5_clip(file: dict):
    """A CLIP holding a tiny T5 ("t5xxl") built by ComfyUI's own text-encoder classes from a
    scaled fp8 state dict, with the options each version's text-encoder loader sets for one
    (or from a plain float one)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.t5
    import comfy.utils
    sd = {k: v for k, v in file.items() if k != "scaled_fp8"}
    if "scaled_fp8" not in file:  # a plain float file
        options = {}
    elif hasattr(comfy.utils, "convert_old_quants"):  # 0.8+: core's mixed-precision layers
        sd, _ = comfy.utils.convert_old_quants(dict(file), model_prefix="", metadata={})
        options = {"quantization_metadata": comfy.utils.detect_layer_quantization(sd, "")}
    else:  # 0.3.75: scaled_fp8_ops
        options = {"scaled_fp8": file["scaled_fp8"].dtype}

    class TinyT5(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, textmodel_json_config=dict(TINY_T5), dtype=dtype,
                             special_tokens={"end": 1, "pad": 0},
                             model_class=comfy.text_encoders.t5.T5, model_options=model_options)

    class TinyT5Clip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, model_options=model_options,
                             name="t5xxl", clip_model=TinyT5)

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinyT5Clip)
    if "state_dict" in inspect.signature(comfy.sd.CLIP).parameters:  # 0.33 loads it on creation
        return comfy.sd.CLIP(target, parameters=1, model_options=options, state_dict=[sd])
    clip = comfy.sd.CLIP(target, parameters=1, model_options=options)
    clip.load_sd(sd)
    return clip


def t5_output(clip) -> torch.Tensor:
    import comfy.model_management as mm
    mm.load_model_gpu(clip.patcher)
    ids = torch.tensor([[5, 17, 3, 42, 9, 1]])
    with torch.inference_mode():
        out = clip.cond_stage_model.t5xxl.transformer(ids, None, dtype=torch.float32)
    return out[0].float().clone()


def test_a_scaled_fp8_t5_is_quantized_from_its_true_weights(comfy):
    """Quantize Text Encoder on a T5 in scaled fp8 (as t5xxl_fp8_e4m3fn_scaled): as above.
    Shown able to fail: weight_of reading module.weight without true_weight -> on 0.3.75 the
    worst layer's error is 2.4e+03; no is_layer -> on 0.33 "a scaled fp8 layer was not seen
    as a layer"; source bytes as weight and bias only -> "encoder.block.1.layer.1.DenseReluDense.wi_1"."""
    from comfy.ops import manual_cast
    from comfy.text_encoders.t5 import T5
    float_t5 = T5(dict(TINY_T5), torch.float32, "meta", manual_cast)
    meta = {k: v for k, v in float_t5.state_dict().items()}
    g = torch.Generator().manual_seed(11)
    float_sd = {k: (torch.randn(tuple(v.shape), generator=g) * 0.05 if v.dim() == 2 else
                    torch.ones(tuple(v.shape))).to(torch.float16) for k, v in meta.items()}
    embeddings = [k for k in float_sd if k == "shared.weight" or "relative_attention_bias" in k]
    file = scaled_fp8_file(float_sd, skip=embeddings)  # its Linear weights, as such files do
    clip = tiny_t5_clip(file)
    snapshot = state_digest(clip)
    reference = t5_output(clip)
    out = comfy.NODE_CLASS_MAPPINGS["QuantKitQuantizeTextEncoder"]().quantize(clip, FORMAT, "auto")
    quantized = out["result"][0]
    print(out["ui"]["text"][0])
    report = quantized.cond_stage_model.quantkit_reports[-1]
    check_layers(quantized.cond_stage_model.t5xxl.transformer, file, report,
                 clip.cond_stage_model.t5xxl.transformer, "transformer.")
    err = rel_err(t5_output(quantized), reference)
    fresh = tiny_t5_clip(float_file(file, true_weights(file)))  # the float noise reference
    layers = recipe_checked_layers(quantized.cond_stage_model, fresh.cond_stage_model.t5xxl, FORMAT, "t5xxl",
                                   prefix="t5xxl.")
    floor = noise_floor_error(fresh.cond_stage_model, layers, lambda: t5_output(fresh), reference)
    low, high = output_error_band(floor)
    print(f"scaled fp8 T5 -> {FORMAT}: output relative error {err:.5f} (band {low:.5f}-{high:.5f})")
    assert_in_band(f"scaled fp8 T5 -> {FORMAT}", err, floor)  # the float8 numbers unscaled: > 1
    import comfy.model_management as mm
    mm.unload_all_models()
    assert state_digest(clip) == snapshot, "the source CLIP changed"


def test_a_model_quantized_from_scaled_fp8_saves_its_true_weights(comfy, sd3_file, base_dir):
    """Save Quantized Model (.gguf) on a model quantized from scaled fp8: the layers the recipe
    keeps (still scaled fp8 in memory) are written as weight x scale, so Load GGUF Model gives
    back the quantized model's output, and a kept layer's loaded weight is the file's float8 x
    scale exactly.
    Shown able to fail: save_quantized_model passing no own_floats to the diffusion model's
    save_gguf -> on 0.3.75 the kept layers are written as they are stored, and Load GGUF Model
    refuses the file ("tensor 't_embedder.mlp.0.scale_weight' has 0 dimensions: the file is
    corrupt")."""
    from comfy.sd import load_diffusion_model_state_dict
    (base_dir / "models" / "diffusion_models").mkdir(parents=True, exist_ok=True)
    patcher = load_diffusion_model_state_dict(dict(sd3_file))
    out = comfy.NODE_CLASS_MAPPINGS["QuantKitQuantizeModel"]().quantize(patcher, "gguf:Q8_0", "auto")
    quantized = out["result"][0]
    kept = [r.name for r in quantized.model.quantkit_reports[-1].layers
            if r.action == report_mod.KEPT and r.name in true_weights(sd3_file)]
    assert kept, "the recipe keeps no scaled layer: the test would show nothing"
    comfy.NODE_CLASS_MAPPINGS["QuantKitSaveQuantizedModel"]().save(quantized, "scaled_fp8/q8", True)
    loader = comfy.NODE_CLASS_MAPPINGS["QuantKitLoadGGUF"]
    assert "scaled_fp8/q8.gguf" in loader.INPUT_TYPES()["required"]["gguf_name"][0]  # listed
    loaded = loader().load("scaled_fp8/q8.gguf")["result"][0]
    root = loaded.model.diffusion_model
    for name in kept:
        layer = root.get_submodule(name)
        weight = layer.dequantized_weight(torch.float32) if isinstance(layer, modules.QuantizedLayer) \
            else layer.weight.float()
        print(f"kept {name}: relative error {rel_err(weight, true_weights(sd3_file)[name]):.2e}")
        assert torch.equal(weight, true_weights(sd3_file)[name]), name
    inputs = sd3_inputs()
    err = rel_err(denoise(loaded, inputs), denoise(quantized, inputs))
    bound = rounding_bound(torch.float32, sd3_roundings(torch.float32))
    print(f"saved and loaded vs quantized: output relative error {err:.2e} (bound {bound:.2e})")
    assert err < bound


def test_fit_model_to_budget_refuses_a_scaled_fp8_model_with_what_to_do(comfy, sd3_file):
    """Fit Model to VRAM Budget measures and counts plain float layers: a scaled fp8 source
    (0.3.75: float8 weights with a scale; 0.33: core mixed-precision layers) is refused with
    what to do, never fitted from the wrong numbers.
    Shown able to fail: comfy_source_layers.is_layer without core's Linear (QUANTIZABLE
    only) -> on 0.33 the layers are not seen and the fit goes on, counting them wrong ("The
    budget of 10.1 MiB ... cannot be met: ... at least 40.2 MiB")."""
    from comfy.sd import load_diffusion_model_state_dict
    patcher = load_diffusion_model_state_dict(dict(sd3_file))
    positive = [[torch.zeros(1, 8, 4096), {"pooled_output": torch.zeros(1, 2048)}]]
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    node = comfy.NODE_CLASS_MAPPINGS["QuantKitFitModelToBudget"]()
    with pytest.raises(errors.QuantKitError, match=r"stores its weight as .* 16-bit file"):
        node.fit(patcher, positive, latent, "% of 16-bit size", 50.0, steps=1)
