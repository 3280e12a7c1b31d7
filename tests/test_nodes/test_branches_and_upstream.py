"""One MODEL feeding two Quantize Model branches in different formats gives two independent
models, each one its own format applied to the source weights; and no QuantKit node changes
a tensor of what it was given (digest over every tensor of the state dict, not a sample).

Expected values come from outside the code under test: gguf-py's quantizer for GGUF,
torchao's own affine quantization primitives for int8."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import pack_module
from harness.standin_clips import PROMPTS, encode, load_family_clip
from harness.state_hash import state_digest
from harness.tiny_models import denoise, sd3_inputs, tiny_sd3_patcher
from harness.tolerances import TIE_FRACTION, rounding_bound

import gguf
from gguf.quants import quantize as gguf_py_quantize

modules = pack_module("backends.engine.modules")
QUANTIZABLE = pack_module("backends.engine.quantize").QUANTIZABLE

pytestmark = pytest.mark.usefixtures("unload_models_after_each_test")


@pytest.fixture(scope="module")
def tiny(comfy):
    patcher = tiny_sd3_patcher()
    inputs = sd3_inputs()
    return patcher, inputs, denoise(patcher, inputs), state_digest(patcher)


def quantized_layers(patcher) -> dict:
    return {n: m for n, m in patcher.model.diffusion_model.named_modules()
            if isinstance(m, modules.QuantizedLayer)}


def payload_storages(patcher) -> set:
    """Storage of the quantized parts (biases are shared with the source by design)."""
    return {p.untyped_storage().data_ptr() for layer in quantized_layers(patcher).values()
            for name, p in layer.named_parameters() if name != "bias"}


def rows(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().reshape(weight.shape[0], -1)


def assert_int8_is_torchaos(layer, source_weight) -> tuple:
    """(largest relative scale difference, fraction of codes that differ) against torchao's."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine
    w = rows(source_weight)
    block = (1, w.shape[1])
    scale, zero = choose_qparams_affine(w, MappingType.SYMMETRIC, block, torch.int8, quant_min=-127,
                                        quant_max=127, eps=1e-12, scale_dtype=torch.float32)
    q = quantize_affine(w, block, scale, zero, torch.int8, quant_min=-127, quant_max=127)
    # one division each: at most one rounding apart
    assert torch.allclose(layer.weight_scale, scale.reshape(-1), rtol=rounding_bound(torch.float32), atol=0)
    diff = (layer.weight.int() - q.int()).abs()
    flipped = (diff > 0).float().mean().item()
    assert diff.max() <= 1 and flipped < TIE_FRACTION  # rounding ties at most
    return ((layer.weight_scale - scale.reshape(-1)).abs() / scale.reshape(-1)).max().item(), flipped


def assert_gguf_is_gguf_pys(layer, source_weight):
    qtype = gguf.GGMLQuantizationType[layer.spec.name]
    np.testing.assert_array_equal(layer.weight.numpy(), gguf_py_quantize(rows(source_weight).numpy(), qtype))


def test_two_branches_in_different_formats_are_independent_and_each_correct(comfy, tiny):
    """Shown able to fail (mutants patched in through a pytest plugin): clone_tree in
    nodes/clone_and_quantize.py returning the clone it made the first time for a source
    (branch b is branch a: the layer sets and formats differ); clone_tree returning the
    source itself (the upstream digest changes after the first branch)."""
    patcher, inputs, reference, digest = tiny
    node = comfy.NODE_CLASS_MAPPINGS["QuantKitQuantizeModel"]()
    a = node.quantize(patcher, "torchao:int8wo", "auto")["result"][0]
    b = node.quantize(patcher, "gguf:Q4_0", "auto")["result"][0]
    assert state_digest(patcher) == digest

    source = {n: m.weight for n, m in patcher.model.diffusion_model.named_modules() if isinstance(m, QUANTIZABLE)}
    layers_a, layers_b = quantized_layers(a), quantized_layers(b)
    assert len(layers_a) >= 30
    # same recipe, so the same layers, but for the final projection kept at <= 4 bits
    assert set(layers_b) <= set(layers_a) and set(layers_a) - set(layers_b) == {"final_layer.linear"}
    measured = []
    for name, layer in layers_a.items():
        assert layer.spec.id == "torchao:int8wo"
        measured.append(assert_int8_is_torchaos(layer, source[name]))
    print(f"int8 vs torchao: scales differ by at most {max(m[0] for m in measured):.1e} (rtol "
          f"{rounding_bound(torch.float32):.1e}), codes by a fraction {max(m[1] for m in measured):.1e} "
          f"(TIE_FRACTION {TIE_FRACTION:.0e})")
    for name, layer in layers_b.items():
        assert layer.spec.id.startswith("gguf:")
        assert_gguf_is_gguf_pys(layer, source[name])
    assert sum(l.spec.id == "gguf:Q4_0" for l in layers_b.values()) >= 30

    ids = lambda m: {id(x) for x in m.model.modules()} | {id(p) for p in m.model.parameters()}  # noqa: E731
    assert not ids(a) & ids(b)
    assert not payload_storages(a) & payload_storages(b)

    out_b, digest_b = denoise(b, inputs), state_digest(b)
    out_a = denoise(a, inputs)
    for layer in layers_a.values():  # change one branch in place
        layer.weight.data.zero_()
    assert not torch.equal(denoise(a, inputs), out_a), "the change shows in branch a"
    assert state_digest(b) == digest_b and torch.equal(denoise(b, inputs), out_b), "branch b untouched"
    assert state_digest(patcher) == digest and torch.equal(denoise(patcher, inputs), reference)


def test_no_quantkit_node_changes_what_it_is_given(comfy, tiny, base_dir):
    """Every QuantKit node that takes a MODEL or CLIP: Quantize Model, Quantize Text
    Encoder, Memory Report (on the upstream and on the quantized pair), Save Quantized Model
    (on the quantized pair); Load GGUF Model / CLIP take none, so they are checked not to
    change the models already in memory. Shown able to fail (mutants patched in through a
    pytest plugin): Memory Report halving a parameter of the MODEL it is given in place
    ("upstream MODEL changed after Memory Report"); Save Quantized Model flipping one
    payload byte before writing ("quantized pair changed after Save Quantized Model");
    Quantize Model working on the source instead of a clone."""
    model, inputs, reference, model_digest = tiny
    clip = load_family_clip("sd15")
    clip_ref, clip_digest = encode(clip, PROMPTS[0]), state_digest(clip)
    nodes = comfy.NODE_CLASS_MAPPINGS

    def upstream_unchanged(after):
        assert state_digest(model) == model_digest, f"the upstream MODEL changed after {after}"
        assert state_digest(clip) == clip_digest, f"the upstream CLIP changed after {after}"

    qmodel = nodes["QuantKitQuantizeModel"]().quantize(model, "gguf:Q4_0", "auto")["result"][0]
    upstream_unchanged("Quantize Model")
    qclip = nodes["QuantKitQuantizeTextEncoder"]().quantize(clip, "gguf:Q4_0", "auto")["result"][0]
    upstream_unchanged("Quantize Text Encoder")
    produced = state_digest(qmodel), state_digest(qclip)

    def quantized_unchanged(after):
        assert (state_digest(qmodel), state_digest(qclip)) == produced, f"the quantized pair changed after {after}"

    nodes["QuantKitMemoryReport"]().report("upstream", True, model=model, clip=clip)
    upstream_unchanged("Memory Report")
    nodes["QuantKitMemoryReport"]().report("quantized", True, model=qmodel, clip=qclip)
    quantized_unchanged("Memory Report")

    folder = base_dir / "models" / "diffusion_models" / "every_node"
    try:
        nodes["QuantKitSaveQuantizedModel"]().save(qmodel, "every_node/tiny", False, clip=qclip)
        quantized_unchanged("Save Quantized Model")
        for loader in ("QuantKitLoadGGUF", "QuantKitLoadGGUFCLIP"):
            nodes[loader].INPUT_TYPES()  # lists the folders anew, as opening the menu does
        loaded = nodes["QuantKitLoadGGUF"]().load("every_node/tiny.gguf")["result"][0]
        loaded_clip = nodes["QuantKitLoadGGUFCLIP"]().load("every_node/tiny_clip_l.gguf",
                                                            "stable_diffusion")["result"][0]
        assert loaded.model is not qmodel.model and loaded_clip.cond_stage_model is not qclip.cond_stage_model
        quantized_unchanged("Load GGUF Model / CLIP")
        upstream_unchanged("Load GGUF Model / CLIP")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(base_dir / "models" / "text_encoders" / "every_node", ignore_errors=True)
    assert torch.equal(denoise(model, inputs), reference), "the upstream MODEL still runs as before"
    assert torch.equal(encode(clip, PROMPTS[0])[0], clip_ref[0]), "the upstream CLIP still encodes as before"


def test_the_digest_sees_what_a_patcher_adds_on_top_of_its_tensors(comfy, tiny):
    """A node could change the upstream MODEL without touching a tensor: a LoRA patch added
    to its patcher, a model_options entry, an object patch. Each changes the digest.
    Shown able to fail: with PATCHER_STATE in tests/harness/state_hash.py emptied, the
    three digests equal the untouched one (first assert)."""
    patcher, _, _, digest = tiny
    key = next(k for k in patcher.model.state_dict() if k.endswith(".weight") and "diffusion_model" in k)
    with_patch = patcher.clone()
    with_patch.add_patches({key: (torch.zeros_like(patcher.model.state_dict()[key]),)}, 0.5)
    with_option = patcher.clone()
    with_option.model_options["transformer_options"]["quantkit_test"] = 1
    with_object = patcher.clone()
    with_object.add_object_patch("diffusion_model.final_layer", torch.nn.Identity())
    digests = {state_digest(p) for p in (with_patch, with_option, with_object)}
    assert digest not in digests and len(digests) == 3
    assert state_digest(patcher.clone()) == digest, "a plain clone holds the same state"
