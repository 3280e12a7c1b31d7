"""On a CUDA GPU, through real ComfyUI: every format that needs or uses the GPU, device moves,
partial (low-VRAM) loading, and ComfyUI's TorchCompileModel on torchao output.
Run on the GPU machine: bash .ci/gpu_tests (the CPU suite deselects these)."""
from __future__ import annotations

import pytest
import torch

from conftest import pack_module
from harness.draws import rel_err
from harness.noise_reference import (assert_in_band, lora_effect_bound, noise_floor_error, quantized_layer_names,
                                     recipe_checked_layers)
from harness.tiny_models import (sample_eager_and_compiled, sd3_inputs, sd3_roundings, tiny_lora,
                                 tiny_sd3_patcher, with_lora)
from harness.tolerances import rounding_bound, tie_flip_error

pytestmark = pytest.mark.gpu

registry = pack_module("backends.engine.registry")
base = pack_module("backends.engine.base")
modules = pack_module("backends.engine.modules")


def _cuda():
    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA GPU: run on the GPU machine (bash .ci/gpu_tests)")
    return torch.device("cuda")


def gpu_formats():
    if not torch.cuda.is_available():
        return registry.all_format_ids()
    return [s.id for a in registry.adapters().values() for s in a.formats.values()
            if base.hardware_problem(s, torch.device("cuda")) is None
            and not s.read_only]  # read-only formats come from .gguf files, not Quantize Model


def compute_dtype(patcher):
    return patcher.model.manual_cast_dtype or patcher.model.get_dtype()


def run(patcher, inputs):
    """The model's output, from its second call: decode groups form after the first."""
    import comfy.model_management as mm
    mm.load_models_gpu([patcher])
    dev = mm.get_torch_device()
    with torch.inference_mode():
        for _ in range(2):
            out = patcher.model.apply_model(*(inputs[k].to(dev) for k in ("x", "t")),
                                            c_crossattn=inputs["c_crossattn"].to(dev),
                                            y=inputs["y"].to(dev)).float().cpu()
    return out


@pytest.fixture(scope="module")
def upstream(comfy):
    _cuda()
    patcher = tiny_sd3_patcher()
    inputs = sd3_inputs()
    return patcher, inputs, run(patcher, inputs)


@pytest.fixture(scope="module")
def upstream_gaussian(comfy):
    """N(0, 0.02) weights: where each format's band around the float noise reference holds."""
    _cuda()
    patcher = tiny_sd3_patcher(heavy=False)
    inputs = sd3_inputs()
    return patcher, inputs, run(patcher, inputs)


def floor_on_gpu(layers, inputs, reference, wrap=lambda p: p):
    """The float noise reference (tests/harness/noise_reference.py) run the way the
    quantized model runs: loaded on the GPU by ComfyUI, in its compute dtype."""
    fresh = tiny_sd3_patcher(heavy=False)
    return noise_floor_error(fresh.model, layers, lambda: run(wrap(fresh), inputs), reference)


def quantize(comfy, model, fmt, quantize_on="auto"):
    node = comfy.NODE_CLASS_MAPPINGS["QuantKitQuantizeModel"]()
    return node.quantize(model, fmt, "auto", "", quantize_on)["result"][0]


@pytest.mark.parametrize("fmt", gpu_formats())
def test_format_on_gpu_loads_moves_and_matches(comfy, upstream_gaussian, fmt):
    """The output error lies in the band around the float noise reference of the same
    layers, as on the CPU. Shown able to fail (reasoned, GPU only): a format given the
    bits_per_weight of another (its floor moves by 2x a bit), or Q2_K payloads reported as
    Q4_K (shown on the CPU by test_output_band_fails_a_format_that_is_not_what_it_claims)."""
    import comfy.model_management as mm
    patcher, inputs, reference = upstream_gaussian
    quantized = quantize(comfy, patcher, fmt)
    out = run(quantized, inputs)
    err = rel_err(out, reference)
    layers = recipe_checked_layers(quantized.model, patcher.model.diffusion_model, fmt, "sd3",
                                   prefix="diffusion_model.")
    floor = floor_on_gpu(layers, inputs, reference)
    print(f"{fmt} on {torch.cuda.get_device_name()}: relative output error {err:.5f}, "
          f"float noise floor {floor:.5f}, ratio {err / floor:.2f}")
    assert torch.isfinite(out).all()
    assert_in_band(fmt, err, floor)
    layers = [m for m in quantized.model.modules() if isinstance(m, modules.QuantizedLayer)]
    assert all(p.is_cuda for l in layers for p in l.parameters()), "loaded onto the GPU"
    assert quantized.loaded_size() == pytest.approx(quantized.model_size(), rel=0.01)
    mm.unload_all_models()
    assert all(not p.is_cuda for l in layers for p in l.parameters()), "offloaded back to RAM"
    assert torch.equal(run(quantized, inputs), out), "same output after a round trip"


def test_quantize_on_gpu_equals_quantize_on_cpu(comfy, upstream):
    """Shown able to fail (reasoned, GPU only): any device-dependent step in quantize_tree
    (backends/engine/quantize.py), e.g. the work-device copy of a weight taken in bf16,
    changes Q8_0's bytes; two different Q8_0 roundings differ by about Q8_0's output noise,
    9 times the tie flips' bound (tie_flip_error: 0.11 x Q8_0's own output error)."""
    patcher, inputs, reference = upstream
    on_gpu = run(quantize(comfy, patcher, "gguf:Q8_0", "gpu"), inputs)
    on_cpu = run(quantize(comfy, patcher, "gguf:Q8_0", "cpu"), inputs)
    own, err = rel_err(on_cpu, reference), rel_err(on_gpu, on_cpu)
    print(f"Q8_0 quantized on the GPU vs on the CPU: output difference {err:.2e} "
          f"(bound {tie_flip_error(own):.2e}, from Q8_0's own output error {own:.5f})")
    assert err < tie_flip_error(own)  # the same quantizer twice: rounding ties at most


def test_partial_load_on_gpu_matches_full_load(comfy, upstream):
    """Shown able to fail (reasoned, GPU only): QuantizedLayer.forward
    (backends/engine/modules.py) not moving its RAM-held parts to the input's device ->
    the partial forward raises a device mismatch; without the comfy_cast_weights marker of
    nodes/comfy_layers.py every layer is loaded and `on_gpu < len(...)` fails."""
    import comfy.model_management as mm
    patcher, inputs, _ = upstream
    quantized = quantize(comfy, patcher, "torchao:int8wo")
    full = run(quantized, inputs)
    mm.unload_all_models()
    weights = sum(t.nelement() * t.element_size() for t in quantized.model.parameters())
    quantized.patch_model(device_to=torch.device("cuda"), lowvram_model_memory=int(weights * 0.6))
    try:
        assert quantized.model.model_lowvram
        on_gpu = sum(p.is_cuda for p in quantized.model.parameters())
        assert 0 < on_gpu < len(list(quantized.model.parameters())), "some layers stay in RAM"
        with torch.inference_mode():
            dev = torch.device("cuda")
            partial = quantized.model.apply_model(inputs["x"].to(dev), inputs["t"].to(dev),
                                                  c_crossattn=inputs["c_crossattn"].to(dev),
                                                  y=inputs["y"].to(dev)).float().cpu()
    finally:
        quantized.unpatch_model(torch.device("cpu"))
    dtype = compute_dtype(quantized)
    err, bound = rel_err(partial, full), rounding_bound(dtype, sd3_roundings(dtype))
    print(f"partial vs full load on the GPU ({dtype}): relative difference {err:.2e} (bound {bound:.2e})")
    assert err < bound


def test_torch_compile_model_node_on_torchao_output(comfy, upstream):
    """Shown able to fail (reasoned, GPU only): a layer forward that torch.compile cannot
    trace (e.g. `.item()` on int8wo's scale in backends/adapters/torchao.py under
    fullgraph) raises; a decode-group cache (backends/kernels/decode_groups.py) serving
    stale weights to the compiled graph puts it beyond 2e-2 of eager."""
    patcher, inputs, _ = upstream
    quantized = quantize(comfy, patcher, "torchao:int8wo")
    eager, compiled, _ = sample_eager_and_compiled(comfy, quantized, inputs, steps=3)
    print(f"compiled vs eager: {rel_err(compiled, eager):.2e}")
    # a measured literal (H200, 2026-12-01): a sampler loop's roundings (CFG, elementwise
    # ops, the steps feeding back) are not counted by rounding_bound yet; a GPU run must
    # measure them before the bound replaces it
    assert rel_err(compiled, eager) < 2e-2


def test_quantized_text_encoder_adds_only_its_own_bytes_on_gpu(comfy):
    """ComfyUI may create a >1 GB text encoder directly on a roomy GPU; quantizing it must not
    leave a second full copy there, and encoding with the copy loads only the copy.
    Shown able to fail (reasoned, GPU only): clone_tree (backends/engine/clone.py) moving
    every float weight to the work device before quantizing -> a full 1.6 GB second copy on
    the GPU: peak > ours + 0.5 GiB."""
    import comfy.model_management as mm
    from comfy.sd import CLIPType, load_text_encoder_state_dicts
    from harness.tiny_models import fill_state_dict
    from bench.standins import components
    _cuda()
    sds = [fill_state_dict(components.clip_l(), seed=1, heavy=False),
           fill_state_dict(components.clip_g(), seed=2, heavy=False)]  # SDXL's pair, 1.6 GB
    clip = load_text_encoder_state_dicts(sds, clip_type=CLIPType.STABLE_DIFFUSION)
    upstream = sum(t.nelement() * t.element_size() for t in clip.cond_stage_model.state_dict().values())
    tokens = clip.tokenize("a lighthouse on a cliff")
    clip.encode_from_tokens(tokens)
    mm.unload_all_models()
    torch.cuda.empty_cache()
    base_alloc = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    node = comfy.NODE_CLASS_MAPPINGS["QuantKitQuantizeTextEncoder"]()
    new = node.quantize(clip, "torchao:int8wo", "all")["result"][0]
    new.encode_from_tokens(tokens)
    ours = new.patcher.model_size()
    peak = torch.cuda.max_memory_allocated() - base_alloc
    print(f"upstream {upstream / 2**30:.2f} GiB, quantized {ours / 2**30:.2f} GiB, peak added {peak / 2**30:.2f} GiB")
    assert ours < upstream * 0.75
    assert peak < ours + 0.5 * 2**30, "only the quantized copy (plus activations) sits on the GPU"


@pytest.mark.parametrize("node_id", ["QuantKitQuantizeTextEncoder", "QuantKitQuantizeModel"])
def test_the_source_leaves_the_gpu_when_its_copy_is_made(comfy, upstream, node_id):
    """A source ComfyUI holds loaded on the GPU (text encoders are created there on a roomy
    card) is unloaded once its quantized copy exists, and still gives the same output when
    used again. Shown able to fail (reasoned, GPU only): without the release_from_gpu call
    in nodes/clone_and_quantize.quantize_patcher the source stays loaded (`not loaded()`)."""
    import comfy.model_management as mm
    from comfy.sd import CLIPType, load_text_encoder_state_dicts
    from harness.tiny_models import fill_state_dict
    from bench.standins import components
    _cuda()
    mm.unload_all_models()
    if node_id == "QuantKitQuantizeTextEncoder":
        source = load_text_encoder_state_dicts([fill_state_dict(components.clip_g(), seed=2, heavy=False)],
                                               clip_type=CLIPType.STABLE_DIFFUSION)
        tokens = source.tokenize("a lighthouse on a cliff")
        use = lambda c: c.encode_from_tokens(tokens).float().cpu()  # noqa: E731
        patcher, args = source.patcher, ("torchao:int8wo", "all")
    else:
        source, inputs, _ = upstream
        use = lambda m: run(m, inputs)  # noqa: E731
        patcher, args = source, ("torchao:int8wo", "auto", "", "auto")
    before = use(source)
    loaded = lambda: any(m.model is not None and m.model.model is patcher.model  # noqa: E731
                         for m in mm.current_loaded_models)
    assert loaded(), "ComfyUI holds the source on the GPU after using it"
    held = torch.cuda.memory_allocated()
    new = comfy.NODE_CLASS_MAPPINGS[node_id]().quantize(source, *args)["result"][0]
    assert not loaded()
    freed = held - torch.cuda.memory_allocated()
    print(f"{node_id}: {freed / 2**20:.0f} MiB freed, source {patcher.model_size() / 2**20:.0f} MiB")
    on_gpu = {n: t.nbytes for n, t in patcher.model.state_dict().items() if t.is_cuda}
    # Dynamic VRAM keeps scalars such as CLIP's logit_scale resident: bytes, not names, count
    assert sum(on_gpu.values()) < 0.01 * patcher.model_size(), f"still on the GPU: {list(on_gpu)[:5]}"
    assert torch.equal(use(source), before)
    assert new is not source


@pytest.mark.parametrize("fmt", ["torchao:fp8dq", "torchao:int4wo"])
def test_cuda_only_formats_on_text_encoders(comfy, fmt):
    """Shown able to fail (reasoned, GPU only): int4wo's group scales applied to the wrong
    groups, or fp8dq dropping its activation scale (backends/adapters/torchao.py) -> the
    cosine falls below 0.9 / 0.99; the cosine floors are loose (0.9 for 4 bits), a format
    slightly worse than it claims would pass."""
    import torch.nn.functional as F
    from comfy.sd import CLIPType, load_text_encoder_state_dicts
    from harness.tiny_models import fill_state_dict
    from bench.standins import components
    _cuda()
    sds = [fill_state_dict(components.clip_l(), seed=1, heavy=False),
           fill_state_dict(components.clip_g(), seed=2, heavy=False)]
    clip = load_text_encoder_state_dicts(sds, clip_type=CLIPType.STABLE_DIFFUSION)
    tokens = clip.tokenize("a lighthouse on a cliff at sunset")
    ref, ref_pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    node = comfy.NODE_CLASS_MAPPINGS["QuantKitQuantizeTextEncoder"]()
    new = node.quantize(clip, fmt, "all")["result"][0]
    out, pooled = new.encode_from_tokens(tokens, return_pooled=True)
    cos = F.cosine_similarity(out.float().flatten(), ref.float().flatten(), dim=0).item()
    print(f"{fmt} on SDXL's CLIP-L + CLIP-G: cosine {cos:.5f}")
    assert torch.isfinite(out).all()
    assert cos > (0.99 if "fp8" in fmt else 0.9)
    assert new.patcher.model_size() < clip.patcher.model_size()


@pytest.mark.parametrize("fmt", ["torchao:int8wo", "gguf:Q4_K"])
def test_lora_after_quantize_on_gpu_acts_as_on_the_unquantized_model(comfy, upstream_gaussian, fmt):
    """Under Dynamic VRAM the unquantized model gets its LoRA through ComfyUI's dynamic
    loader; the quantized one through its own patcher. Both must show the same effect:
    the output with the LoRA in the band around the float noise reference with the LoRA,
    and the effect off by at most both bands.
    Shown able to fail (reasoned, GPU only): QuantModelPatcher.patch_weight_to_device not
    installing its OnTheFlyPatch (shown on the CPU by test_lora_applies_to_a_loaded_gguf_model)
    -> the LoRA has no effect: effect error 1.0 above the bound."""
    patcher, inputs, reference = upstream_gaussian
    lora, _ = tiny_lora(patcher, heavy=False)
    ref_lora = run(with_lora(patcher, lora), inputs)
    assert rel_err(ref_lora, reference) > 0.05, "the test LoRA must change the output visibly"
    quantized = quantize(comfy, patcher, fmt)
    layers = quantized_layer_names(quantized.model)
    plain = run(quantized, inputs)
    after = run(with_lora(quantized, lora), inputs)
    floor_after = floor_on_gpu(layers, inputs, ref_lora, lambda p: with_lora(p, lora))
    floor_plain = floor_on_gpu(layers, inputs, reference)
    err = rel_err(after, ref_lora)
    effect_bound = lora_effect_bound(floor_after, floor_plain, ref_lora, reference)
    effect_err = rel_err(after - plain, ref_lora - reference)
    print(f"{fmt} LoRA on GPU: error {err:.5f} (floor {floor_after:.5f}), effect error {effect_err:.4f} (bound {effect_bound:.4f})")
    assert_in_band(f"{fmt} with LoRA", err, floor_after)
    assert effect_err <= effect_bound


def test_upstream_clip_still_works_after_quantize_text_encoder_on_gpu(comfy):
    """ComfyUI 0.33 with Dynamic VRAM once freed pinned buffers twice (the server aborted)
    when the original CLIP was loaded after Quantize Text Encoder had copied it.
    Shown able to fail (reasoned, GPU only, ComfyUI 0.33 with Dynamic VRAM): clone_tree
    without the is_loader_state drop (shown on the CPU by test_copy_shares_...) -> the copy
    frees the source's pins: the process aborts or `again` differs from `ref`."""
    import gc
    import comfy.model_management as mm
    from comfy.sd import CLIPType, load_text_encoder_state_dicts
    from harness.tiny_models import fill_state_dict
    from bench.standins import components
    _cuda()
    clip = load_text_encoder_state_dicts([fill_state_dict(components.clip_l(), seed=1, heavy=False)],
                                         clip_type=CLIPType.STABLE_DIFFUSION)
    tokens = clip.tokenize("a lighthouse on a cliff")
    ref = clip.encode_from_tokens(tokens).float().cpu()
    node = comfy.NODE_CLASS_MAPPINGS["QuantKitQuantizeTextEncoder"]()
    new = node.quantize(clip, "gguf:Q8_0", "all")["result"][0]
    quantized = new.encode_from_tokens(tokens).float().cpu()
    layers = recipe_checked_layers(new.cond_stage_model, clip.cond_stage_model.clip_l, "gguf:Q8_0", "clip_l",
                                   prefix="clip_l.")
    again = clip.encode_from_tokens(tokens).float().cpu()
    mm.unload_all_models()
    del new
    gc.collect()
    once_more = clip.encode_from_tokens(tokens).float().cpu()
    assert torch.equal(again, ref) and torch.equal(once_more, ref)
    fresh = load_text_encoder_state_dicts([fill_state_dict(components.clip_l(), seed=1, heavy=False)],
                                          clip_type=CLIPType.STABLE_DIFFUSION)  # the float noise reference
    floor = noise_floor_error(fresh.cond_stage_model, layers,
                              lambda: fresh.encode_from_tokens(tokens).float().cpu(), ref)
    err = rel_err(quantized, ref)
    print(f"gguf:Q8_0 CLIP-L: relative error {err:.5f}, float noise floor {floor:.5f}, ratio {err / floor:.2f}")
    assert_in_band("gguf:Q8_0 CLIP-L", err, floor)


def test_memory_report_gpu_figures(comfy, upstream):
    """The quantized model's bytes on the GPU as ComfyUI loaded them; under Dynamic VRAM the
    unquantized model's staged bytes come from ComfyUI, not from tensor devices.
    Shown able to fail (reasoned, GPU only): TreeCensus.gpu_bytes
    (backends/engine/storage_census.py) matching whole device strings against "cuda" ->
    "cuda:0" bytes are missed: 0, not about model_size(); collect_components
    (nodes/memory_census.py) not matching current_loaded_models -> loaded_on is None."""
    import comfy.model_management as mm
    census = pack_module("nodes.memory_census")
    patcher, inputs, _ = upstream
    quantized = quantize(comfy, patcher, "gguf:Q8_0")
    run(patcher, inputs)
    run(quantized, inputs)
    snap = census.take_snapshot("gpu", model=quantized)
    ours = next(c for c in snap.components if c.name == "model")
    assert ours.loaded_on and ours.loaded_on.startswith("cuda") and not ours.dynamic
    assert ours.census.gpu_bytes == pytest.approx(quantized.model_size(), rel=0.02)
    upstream_c = next((c for c in snap.components if not c.wired and c.census.parameters), None)
    assert upstream_c is not None, "the loaded unquantized model is listed"
    if upstream_c.dynamic:
        assert upstream_c.loaded_bytes > 0
    else:
        assert upstream_c.census.gpu_bytes > 0
    text = pack_module("nodes.memory_text").report_text(snap)
    print(text)
    mm.unload_all_models()


def test_comfyui_runs_in_the_mode_under_test(comfy, upstream):
    """The matrix means something only if Dynamic VRAM is really on where it should be:
    ComfyUI's own loader gives the unquantized model a dynamic patcher then, and the
    quantized copy keeps the classic one.
    Shown able to fail (reasoned, GPU only): new_quantized_patcher (nodes/comfy_patcher.py)
    building on the source's class (ModelPatcherDynamic on 0.33) -> the last assertion."""
    from bench.dynamic_vram import dynamic_vram_wanted
    patcher = upstream[0]
    expected = dynamic_vram_wanted()
    print(f"Dynamic VRAM expected: {expected}")
    assert getattr(patcher, "is_dynamic", lambda: False)() == expected
    assert not getattr(quantize(comfy, patcher, "gguf:Q8_0"), "is_dynamic", lambda: False)()


def test_model_run_in_another_dtype_than_stored(comfy):
    """--bf16-unet on an fp16 file: under Dynamic VRAM core keeps fp16 tensors and casts
    them per call; the quantized copy must hold its kept layers in bf16 (this once failed
    with 'mat1 and mat2 must have the same dtype').
    Shown able to fail (reasoned, GPU only): without settle_stored_dtypes in quantize_patcher
    (nodes/clone_and_quantize.py) the kept layers stay fp16 (float16 in `kept`)."""
    from comfy.sd import load_diffusion_model_state_dict
    from harness.tiny_models import tiny_sd3_state_dict
    _cuda()
    patcher = load_diffusion_model_state_dict(tiny_sd3_state_dict(heavy=False), model_options={"dtype": torch.bfloat16})
    inputs = sd3_inputs()
    reference = run(patcher, inputs)
    quantized = quantize(comfy, patcher, "torchao:int8wo")
    out = run(quantized, inputs)
    kept = {p.dtype for m in quantized.model.modules() if not isinstance(m, modules.QuantizedLayer)
            for p in m.parameters(recurse=False) if p.is_floating_point()}
    assert torch.float16 not in kept, kept
    fresh = load_diffusion_model_state_dict(tiny_sd3_state_dict(heavy=False), model_options={"dtype": torch.bfloat16})
    floor = noise_floor_error(fresh.model, quantized_layer_names(quantized.model), lambda: run(fresh, inputs), reference)
    assert_in_band("torchao:int8wo computing in bf16", rel_err(out, reference), floor)
