"""Memory Report through real ComfyUI: in-process on a small model tree holding QuantKit
int8 layers and plain fp16 layers, and once on a real server."""
from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import pack_module
from harness.comfy_server import ComfyServer

NODE = "QuantKitMemoryReport"
INT8 = "torchao:int8wo"

quantize_mod = pack_module("backends.engine.quantize")
recipes = pack_module("backends.engine.recipes")


class MemoryReportNet(nn.Module):
    """Two 256x256 layers big enough to quantize; the small ones stay fp16."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256, bias=False))
        self.norm = nn.LayerNorm(256)
        self.head = nn.Linear(256, 32)
        self.register_buffer("positions", torch.arange(64, dtype=torch.float16))


def storage_bytes_by_dtype(module):
    out = Counter()
    for t in list(module.parameters()) + list(module.buffers()):
        out[t.dtype] += t.nelement() * t.element_size()
    return out


@pytest.fixture
def tiny(comfy):
    """(patcher, figures of the fp16 model before quantization)."""
    torch.manual_seed(0)
    root = MemoryReportNet().half()
    before = {"bytes": sum(storage_bytes_by_dtype(root).values()),
              "parameters": sum(p.numel() for p in root.parameters())}
    report = quantize_mod.quantize_tree(root, INT8, recipes.get_recipe("generic"), target="tiny net",
                                        layer_cls=pack_module("nodes.comfy_layers").LAYER_CLASSES)
    root.quantkit_reports = (report,)  # as the Quantize nodes attach it
    return cpu_patcher(root), before


def cpu_patcher(module):
    from comfy.model_patcher import ModelPatcher  # importable once the `comfy` fixture ran
    return ModelPatcher(module, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def run_node(comfy, **inputs):
    node = comfy.NODE_CLASS_MAPPINGS[NODE]()
    inputs.setdefault("label", "test")
    inputs.setdefault("reset_peak", False)
    return node.report(**inputs)


def component(snapshot, name):
    return next(c for c in snapshot.components if c.name == name)


def test_interface(comfy):
    """Shown able to fail: the reset_peak input's "tooltip" key renamed in
    nodes/memory_report.py's INPUT_TYPES -> `assert opts.get("tooltip")` fails."""
    cls = comfy.NODE_CLASS_MAPPINGS[NODE]
    assert cls.CATEGORY == "QuantKit"
    assert cls.RETURN_TYPES == ("MODEL", "CLIP", "VAE", "LATENT", "IMAGE", "STRING", "IMAGE")
    assert cls.RETURN_NAMES == ("model", "clip", "vae", "latent", "image", "report", "chart")
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) and cls.DESCRIPTION
    spec = cls.INPUT_TYPES()
    assert set(spec["required"]) == {"label", "reset_peak"}
    assert set(spec["optional"]) == {"model", "clip", "vae", "latent", "image"}
    for _, (_, opts) in list(spec["required"].items()) + list(spec["optional"].items()):
        assert opts.get("tooltip")
    # Cached like any node: an inline report must not force the sampler after it to re-run.
    assert not hasattr(cls, "IS_CHANGED")


def test_census_bytes_match_the_tensors(comfy, tiny):
    """Shown able to fail: tensor_entry in backends/engine/storage_census.py counting only
    `weight` (not its `weight_*` scales) in the layer's format -> bytes_by_format shows the
    int8 layers' fp32 scales as "fp32" and differs."""
    patcher, before = tiny
    by_dtype = storage_bytes_by_dtype(patcher.model)
    assert set(by_dtype) == {torch.int8, torch.float32, torch.float16}  # payload, scales, the rest
    snap = pack_module("nodes.memory_census").take_snapshot("t", model=patcher)
    cen = component(snap, "model").census
    assert cen.bytes_by_format == {INT8: by_dtype[torch.int8] + by_dtype[torch.float32],
                                   "fp16": by_dtype[torch.float16]}
    assert cen.stored_bytes == sum(by_dtype.values())
    assert cen.bytes_by_device == {"cpu": cen.stored_bytes}
    assert (cen.gpu_bytes, cen.offloaded_bytes) == (0, cen.stored_bytes)
    assert cen.bytes_at_16bit == before["bytes"]  # the same model, all fp16
    assert cen.parameters == before["parameters"]
    assert 0 < cen.saving_vs_16bit < before["bytes"]


def test_report_text_passthrough_and_chart(comfy, tiny):
    """Shown able to fail: MemoryReport.report returning None in place of the latent ->
    `result[3] is latent` fails."""
    patcher, _ = tiny
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    image = torch.rand(1, 16, 16, 3)
    out = run_node(comfy, label="after quantize", model=patcher, latent=latent, image=image)
    result, text = out["result"], out["ui"]["text"][0]
    assert result[0] is patcher and result[3] is latent and result[4] is image
    assert result[1] is None and result[2] is None
    assert result[5] == text

    cen = component(pack_module("nodes.memory_census").take_snapshot("t", model=patcher), "model").census
    fmt = pack_module("nodes.memory_text").format_bytes
    assert "Memory Report - after quantize" in text
    assert f"{INT8} {fmt(cen.bytes_by_format[INT8])}" in text
    assert f"fp16 {fmt(cen.bytes_by_format['fp16'])}" in text
    assert f"{fmt(cen.stored_bytes)} stored; at 16 bits {fmt(cen.bytes_at_16bit)}" in text
    assert "quantized by QuantKit: tiny net -> torchao:int8wo (generic recipe): 2 layers quantized" in text
    assert "latent: [1, 4, 8, 8] fp32 on cpu" in text and "image: [1, 16, 16, 3]" in text

    chart_mod = pack_module("nodes.memory_chart")
    chart = result[6]
    assert chart.dtype == torch.float32
    assert tuple(chart.shape) == (1, chart_mod.CHART_HEIGHT, chart_mod.CHART_WIDTH, 3)
    assert 0.0 <= chart.min().item() and chart.max().item() <= 1.0
    png = io.BytesIO()
    Image.fromarray((chart[0].numpy() * 255).round().astype(np.uint8)).save(png, format="PNG")
    decoded = Image.open(io.BytesIO(png.getvalue()))
    assert decoded.size == (chart_mod.CHART_WIDTH, chart_mod.CHART_HEIGHT)
    pixels = {tuple(p) for p in np.asarray(decoded.convert("RGB")).reshape(-1, 3)}
    assert chart_mod.DTYPE_COLORS["fp16"] in pixels and chart_mod.REFERENCE_BAR in pixels


def test_cpu_only_report_has_ram_and_no_vram(comfy):
    """Shown able to fail: without the "Peak counters were reset" line in
    nodes/memory_text.report_text -> its assertion fails."""
    out = run_node(comfy, reset_peak=True)
    text = out["ui"]["text"][0]
    assert "RAM:" in text and "this process" in text and "RSS" in text
    assert "VRAM" not in text and "GPU" not in text.replace("no GPU", "")
    assert "Peak counters were reset" in text
    assert out["result"][:5] == (None,) * 5
    assert pack_module("nodes.memory_census").take_snapshot("").devices.gpu is None


def test_models_loaded_by_comfyui_are_listed_once(comfy, tiny):
    """Shown able to fail: collect_components in nodes/memory_census.py adding every loaded
    model (no `module_id not in seen` check) -> the model is listed twice (2 == 1)."""
    import comfy.model_management as mm
    patcher, _ = tiny
    mm.load_models_gpu([patcher])
    try:
        snap = pack_module("nodes.memory_census").take_snapshot("t")
        mine = [c for c in snap.components if c.model_class == "MemoryReportNet"]
        assert len(mine) == 1 and not mine[0].wired and mine[0].loaded_on == "cpu"
        wired = pack_module("nodes.memory_census").take_snapshot("t", model=patcher)
        mine = [c for c in wired.components if c.model_class == "MemoryReportNet"]
        assert len(mine) == 1 and mine[0].wired and mine[0].loaded_on == "cpu"
        text = run_node(comfy, model=patcher)["ui"]["text"][0]
        assert "[model] MemoryReportNet - loaded by ComfyUI for cpu" in text
    finally:
        for i, loaded in enumerate(mm.current_loaded_models):
            if loaded.model is patcher:
                mm.current_loaded_models.pop(i).model_unload()
                break


def test_shared_weights_are_counted_once(comfy, tiny):
    """Shown able to fail: take_snapshot in nodes/memory_census.py passing shared_bytes=0
    -> `snap.shared_bytes == head_bytes + ...` fails (0 == 16448)."""
    patcher, _ = tiny
    census_mod, storage = pack_module("nodes.memory_census"), pack_module("backends.engine.storage_census")
    # the head's own patcher, wired as if it were a VAE: it shares its tensors with the model
    snap = census_mod.take_snapshot("t", model=patcher, vae=cpu_patcher(patcher.model.head))
    model, vae = component(snap, "model").census, component(snap, "vae").census
    head_bytes = sum(t.nelement() * t.element_size() for t in patcher.model.head.parameters())
    assert vae.stored_bytes == head_bytes
    assert storage.shared_bytes(model, vae) == head_bytes
    # models other tests left loaded may share weights among themselves too
    others = [c.census for c in snap.components if not c.wired]
    assert snap.shared_bytes == head_bytes + storage.shared_bytes(*others)
    assert snap.total_model_bytes == model.stored_bytes + sum(o.stored_bytes for o in others) - \
        storage.shared_bytes(*others), "the VAE adds no bytes"


@pytest.mark.server
def test_server_runs_the_report_and_saves_the_chart(comfy, tmp_path):
    """Shown able to fail (reasoned, server test): the node's chart output (slot 6) being
    the passed-through image instead of the chart -> SaveImage gets nothing from the empty
    image input and the prompt fails, or the saved size is not CHART_WIDTH x CHART_HEIGHT."""
    chart_mod = pack_module("nodes.memory_chart")
    server = ComfyServer(tmp_path / "comfy", models_root=tmp_path / "models")
    try:
        server.start()
        prompt = {
            "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "2": {"class_type": NODE, "inputs": {"label": "server", "reset_peak": True, "latent": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 6], "filename_prefix": "memory"}},
        }
        entry = server.run(prompt, timeout=300)
        text = entry["outputs"]["2"]["text"][0]
        assert text.startswith("Memory Report - server") and "RAM:" in text
        assert "latent: [1, 4, 8, 8] fp32" in text
        saved = entry["outputs"]["3"]["images"][0]
        path = server.base_dir / "output" / saved["subfolder"] / saved["filename"]
        assert Image.open(path).size == (chart_mod.CHART_WIDTH, chart_mod.CHART_HEIGHT)
    finally:
        server.stop()


def test_core_quantized_tensors_are_counted_at_their_stored_size(comfy):
    """ComfyUI's own QuantizedTensor (fp8 with a scale): a dict of layout parameters in
    0.3.x, comfy-kitchen's dataclass in 0.33; counted as data plus scale either way.
    Shown able to fail: _foreign_format in backends/engine/storage_census.py leaving out
    the layout tensors (`+ extra`) -> stored_bytes is 32768, not 32768 + 4."""
    from comfy.quant_ops import QuantizedTensor
    census = pack_module("backends.engine.storage_census")
    w = torch.randn(256, 128)
    qt = QuantizedTensor.from_float(w, "TensorCoreFP8Layout")
    entry = census.tensor_entry(qt, True)
    scale = qt._layout_params["scale"] if hasattr(qt, "_layout_params") else qt._params.scale
    assert entry.stored_bytes == 256 * 128 + scale.nelement() * scale.element_size()
    assert entry.logical_elements == 256 * 128
    assert entry.format.startswith("fp8_e4m3fn")
