"""Load GGUF Model through real ComfyUI: a file written from a quantized tiny SD3 loads
back into the same quantized layers, bytes and outputs; bad files give clear errors."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import gguf
from gguf.quants import quantize as np_quantize

from conftest import pack_module
from harness.draws import rel_err
from harness.tiny_models import (denoise, sample_eager_and_compiled, sd3_inputs, sd3_roundings,
                                 tiny_sd3_patcher, tiny_sd3_state_dict)
from harness.tolerances import rounding_bound

modules = pack_module("backends.engine.modules")
errors = pack_module("backends.engine.errors")
save_gguf = pack_module("backends.gguf.export").save_gguf


@pytest.fixture(scope="module")
def gguf_file(comfy, base_dir):
    source = tiny_sd3_patcher()
    node = comfy.NODE_CLASS_MAPPINGS["QuantKitQuantizeModel"]()
    quantized = node.quantize(source, "gguf:Q4_K", "auto")["result"][0]
    folder = base_dir / "models" / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "qk_tiny_sd3_Q4_K.gguf"
    save_gguf(quantized.model.diffusion_model, path, "sd3", {"general.name": path.stem})
    return path, quantized


def load(comfy, name):
    node = comfy.NODE_CLASS_MAPPINGS["QuantKitLoadGGUF"]
    assert name in node.INPUT_TYPES()["required"]["gguf_name"][0], "the file is listed"
    out = node().load(name)
    return out["result"][0], out["ui"]["text"][0]


def test_loaded_model_equals_in_memory_quantization(comfy, gguf_file):
    """Shown able to fail: swap_in_quantized in nodes/load_gguf.py skipping the first lazy
    layer (`lazy_layers(root)[1:]`) -> context_embedder is missing from the loaded layers."""
    path, quantized = gguf_file
    model, text = load(comfy, path.name)
    assert "quantized" in text
    layers = {n: m for n, m in model.model.diffusion_model.named_modules()
              if isinstance(m, modules.QuantizedLayer)}
    expected = {n: m for n, m in quantized.model.diffusion_model.named_modules()
                if isinstance(m, modules.QuantizedLayer)}
    assert set(layers) == set(expected)
    for name, layer in layers.items():
        assert layer.spec.id == expected[name].spec.id
        assert torch.equal(layer.weight, expected[name].weight), f"{name}: bytes differ from the file"
    inputs = sd3_inputs()
    out, ref = denoise(model, inputs), denoise(quantized, inputs)
    err, bound = rel_err(out, ref), rounding_bound(torch.float32, sd3_roundings(torch.float32))
    print(f"loaded vs in-memory Q4_K: relative difference {err:.2e} (bound {bound:.2e})")
    assert err < bound
    file_bytes = sum(l.weight.nelement() for l in layers.values())
    assert file_bytes < 0.33 * sum(l.weight_shape.numel() * 2 for l in layers.values()), "~4.5 bits in memory"


def test_lora_applies_to_a_loaded_gguf_model(comfy, gguf_file):
    """Shown able to fail: QuantModelPatcher.patch_weight_to_device (nodes/comfy_patcher.py)
    not installing its OnTheFlyPatch -> the LoRA changes nothing (0.0 > 0.01 fails)."""
    from comfy.sd import load_lora_for_models
    model, _ = load(comfy, gguf_file[0].name)
    key = "diffusion_model.joint_blocks.1.x_block.mlp.fc1"
    w = model.model.state_dict()[key + ".weight"]
    out_f, in_f = model.model.diffusion_model.joint_blocks[1].x_block.mlp.fc1.weight_shape
    g = torch.Generator().manual_seed(1)
    lora = {f"{key}.lora_up.weight": torch.randn(out_f, 4, generator=g) * 0.5,
            f"{key}.lora_down.weight": torch.randn(4, in_f, generator=g) * 0.5}
    patched, _ = load_lora_for_models(model, None, lora, 1.0, 0.0)
    inputs = sd3_inputs()
    assert rel_err(denoise(patched, inputs), denoise(model, inputs)) > 0.01
    assert w.dtype == torch.uint8


# layer -> the type its weight is written in; biases and every other tensor as in
# _write_typed: 1-D F32, the rest F16
TYPED_LAYERS = {"joint_blocks.1.x_block.mlp.fc1": "Q8_0", "joint_blocks.1.x_block.mlp.fc2": "BF16",
                "joint_blocks.1.context_block.mlp.fc1": "F32"}
GGUF_BYTES = {"Q8_0": (32, 34), "BF16": (1, 2), "F32": (1, 4)}  # (weights, bytes) per block


def _write_typed(path, sd):
    """With gguf-py alone: the weights of TYPED_LAYERS in their type, 1-D tensors F32,
    everything else F16."""
    writer = gguf.GGUFWriter(str(path), "sd3")
    for key, tensor in sorted(sd.items()):
        array = tensor.float().numpy()
        qtype = TYPED_LAYERS.get(key.removesuffix(".weight")) if key.endswith(".weight") else None
        if qtype is not None:
            data = np_quantize(array, gguf.GGMLQuantizationType[qtype])
            writer.add_tensor(key, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType[qtype])
        else:
            writer.add_tensor(key, array if tensor.dim() <= 1 else array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_report_of_a_file_counts_its_bytes_against_16_bits(comfy, base_dir):
    """A file has no float source: each layer's bytes are compared with the same values at
    16 bits (2 bytes each), and the text says so; stored bytes are each type's. Expected
    figures come from the shapes and GGUF's block sizes only.
    Shown able to fail: file_report (nodes/gguf_report.py) recording a quantized layer's
    `values` without its bias -> the Q8_0 layer's bytes_before is 524288, not 526336;
    QuantReport.sizes_text without " at 16 bits" -> the text assertions fail."""
    sd = tiny_sd3_state_dict(seed=13)
    folder = base_dir / "models" / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    _write_typed(folder / "typed_layers.gguf", sd)
    model, text = load(comfy, "typed_layers.gguf")
    report, = model.model.quantkit_reports
    records = {r.name: r for r in report.layers}
    for name, qtype in TYPED_LAYERS.items():
        weights, bias = sd[f"{name}.weight"].numel(), sd[f"{name}.bias"].numel()
        per_block, block_bytes = GGUF_BYTES[qtype]
        record = records[name]
        assert record.bytes_after == weights // per_block * block_bytes + 4 * bias, (name, qtype)
        assert record.bytes_before == 2 * (weights + bias), (name, qtype)
        assert (record.action, record.format_id) == (("quantized", "gguf:Q8_0") if qtype == "Q8_0"
                                                     else ("kept", None)), name
    q8 = records["joint_blocks.1.x_block.mlp.fc1"]
    assert report.bytes_by_format()["gguf:Q8_0"] == q8.bytes_after, "the only Q8_0 layer"
    assert report.format_id == "types BF16, F16, F32, Q8_0"
    parameters = sum(t.numel() for k, t in sd.items() if k != "pos_embed")  # a buffer, not counted
    assert report.bytes_before == 2 * parameters, "every parameter at 16 bits"
    mib = report.bytes_before / 2**20
    assert f"; {mib:.1f} MiB at 16 bits -> " in text, text
    snap = pack_module("nodes.memory_census").take_snapshot("t", model=model)
    memory_text = pack_module("nodes.memory_text")
    line = memory_text.quantkit_line(report)
    assert f"{memory_text.format_bytes(report.bytes_before)} at 16 bits -> " in line
    assert line in memory_text.report_text(snap)
    copied = copy.deepcopy(model.model.quantkit_reports)  # what a deep copy of the model does to it
    assert copied == model.model.quantkit_reports and memory_text.quantkit_line(copied[0]) == line


@pytest.mark.parametrize("content,match", [
    (b"", "empty|too short|not a GGUF|truncated"),
    (b"NOTGGUF" + bytes(200), "not a GGUF|magic"),
    (5000, "truncated|corrupt|past the end|ends"),
    (-100, "truncated|past the end"),
], ids=["empty", "bad-magic", "truncated-header", "truncated-data"])
def test_malformed_files_are_clear_errors(comfy, base_dir, gguf_file, content, match):
    """An int: the first `content` bytes of a good file (5000: cut inside its header; -100:
    the last tensor's data cut short). Shown able to fail: without the `size < 24` check in
    backends/gguf/file._open the empty file raises ValueError (cannot mmap an empty file);
    without the bounds check in header._Cursor.take the header cut raises a struct error;
    without the `end > size` check in header._check_extents the data cut gives a RuntimeError
    (shape '[512]' is invalid for input of size 479)."""
    folder = base_dir / "models" / "diffusion_models"
    data = content if isinstance(content, bytes) else gguf_file[0].read_bytes()[:content]
    bad = folder / f"bad_{len(data)}.gguf"
    bad.write_bytes(data)
    with pytest.raises(errors.MalformedFile, match=f"(?i){match}"):
        load(comfy, bad.name)


def test_loaded_model_uses_the_classic_patcher(comfy, gguf_file):
    """Load GGUF builds its model outside Dynamic VRAM (0.33 would otherwise rebuild it
    from the file's float placeholders for TorchCompileModel), with a fresh patcher.
    Shown able to fail: load_gguf_model returning the loader's own patcher instead of
    new_quantized_patcher(...) -> not a QuantModelPatcher. (The Dynamic VRAM checks can fail
    only on ComfyUI 0.33 with a GPU: drop classic_patcher_kwargs there, reasoned.)"""
    from comfy.model_patcher import ModelPatcher
    model, _ = load(comfy, gguf_file[0].name)
    assert isinstance(model, ModelPatcher)
    assert isinstance(model, pack_module("nodes.comfy_patcher").QuantModelPatcher), "a fresh patcher of ours"
    assert not getattr(model, "is_dynamic", lambda: False)()
    assert not hasattr(model.model, "dynamic_pins")
    clone = model.clone(**({"disable_dynamic": True} if "disable_dynamic" in
                           model.clone.__code__.co_varnames else {}))
    assert clone.model is model.model, "a clone shares the loaded quantized model"


@pytest.mark.gpu
def test_torch_compile_model_on_a_loaded_gguf_model(comfy, gguf_file):
    """Shown able to fail (reasoned, GPU only): load_gguf_model without
    classic_patcher_kwargs on ComfyUI 0.33 gives a Dynamic VRAM patcher that TorchCompileModel
    rebuilds from the file's meta placeholders: no QuantizedLayer in the compiled model."""
    import comfy.model_management as mm
    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA GPU: run on the GPU machine (bash .ci/gpu_tests)")
    model, _ = load(comfy, gguf_file[0].name)
    eager, compiled, compiled_model = sample_eager_and_compiled(comfy, model, sd3_inputs())
    assert any(isinstance(m, modules.QuantizedLayer) for m in compiled_model.model.modules()), \
        "the compiled model is the file's quantized model, not a float rebuild"
    print(f"compiled vs eager: {rel_err(compiled, eager):.2e}")
    # a measured literal, as in test_gpu_model_management's compile test (see there)
    assert rel_err(compiled, eager) < 2e-2
    mm.unload_all_models()
