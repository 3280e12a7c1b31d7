"""The bundled SDXL, SD3, PixArt, Flux and AuraFlow workflows end to end through a real
ComfyUI server (each test starts its own). A module of their own, collected right after
test_comfy_server.py: its `server` fixture (a whole ComfyUI holding the SD1.5 workflow's
models) is gone before these start, and the test process has not yet grown with the
in-process model tests, so one big server at a time fits a 24 GB machine."""
from __future__ import annotations

import json

import pytest

from harness import workflow_builder
from harness.comfy_server import ComfyServer
from harness.gguf_files import llama_cpp_t5_name, safetensors_items, write_file
from harness.locations import REPO_ROOT, standins_path
from harness.workflow_api import to_api

pytestmark = pytest.mark.server


def _run_workflow(tmp_path, name, size, extra_args=(), timeout=2400):
    workflow = json.loads((REPO_ROOT / "workflows" / name).read_text())
    with ComfyServer(tmp_path / "base", extra_args=extra_args) as srv:
        prompt = to_api(workflow, srv.object_info())
        for node in prompt.values():
            inputs = node["inputs"]
            for key in ("width", "height"):
                if isinstance(inputs.get(key), int):
                    inputs[key] = size
            if node["class_type"] == "KSampler":
                inputs["steps"] = 2
        entry = srv.run(prompt, timeout=timeout)
        images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
        texts = [t for out in entry["outputs"].values() for t in out.get("text", [])]
        from PIL import Image
        picture = next(i for i in images if "_memory" not in i["filename"])  # not the chart
        return Image.open(srv.base_dir / "output" / picture["filename"]).size, texts, srv.log_text()


@pytest.mark.slow
def test_sdxl_workflow_end_to_end(tmp_path):
    """Shown able to fail (reasoned, slow server test): choose_encoders
    (nodes/quantize_text_encoder.py) quantizing clip_g for 'auto' -> "clip_g: " is in the
    report."""
    size, texts, _ = _run_workflow(tmp_path, "sdxl_quantized.json", 128, ["--bf16-unet"])
    assert size == (128, 128)
    report = "\n".join(texts)
    assert "clip_l: torchao:int8wo" in report and "clip_g: " not in report, "auto keeps CLIP-G"
    assert "diffusion model: torchao:int8wo (sdxl recipe)" in report


@pytest.mark.slow
def test_sd3_workflow_end_to_end_with_quantized_t5(tmp_path):
    """Shown able to fail (reasoned, slow server test): 'auto' leaving out
    t5xxl in choose_encoders -> "t5xxl: torchao:int8wo" is missing; detect_family not
    mapping "SD3" -> "(generic recipe)"."""
    size, texts, _ = _run_workflow(tmp_path, "sd3_quantized.json", 128)
    assert size == (128, 128)
    report = "\n".join(texts)
    assert "diffusion model: torchao:int8wo (sd3 recipe)" in report
    assert "t5xxl: torchao:int8wo" in report and "clip_l: torchao:int8wo" in report


@pytest.mark.slow
@pytest.mark.both_versions
def test_pixart_workflow_end_to_end_with_quantized_t5(tmp_path):
    """Shown able to fail (reasoned, slow server test): "PixArtSigma" missing from
    FAMILY_BY_CONFIG in nodes/quantize_model.py -> "(generic recipe)", not "(pixart recipe)"."""
    # PixArt needs >= 40x40 latents; the fp8 flag keeps the source T5 at its stored 4.8 GB
    # (ComfyUI would widen it to 9.5 GB in fp16) so a 24 GB machine holds it and its copy.
    size, texts, _ = _run_workflow(tmp_path, "pixart_quantized.json", 320, ["--fp8_e4m3fn-text-enc"])
    assert size == (320, 320)
    report = "\n".join(texts)
    assert "diffusion model: torchao:int8wo (pixart recipe)" in report
    assert "t5xxl: torchao:int8wo" in report


@pytest.mark.slow
@pytest.mark.both_versions
def test_flux_workflow_end_to_end_with_quantized_t5(tmp_path):
    """flux_quantized.json: a FLUX.1 [dev] stand-in (one block of each kind, full width) from
    its own files, CLIP-L + T5-XXL from Dual CLIP Loader, FluxGuidance at cfg 1.
    Shown able to fail: "Flux" missing from FAMILY_BY_CONFIG in nodes/quantize_model.py ->
    the report reads "(generic recipe)" after a warning, not "(flux recipe)"."""
    size, texts, _ = _run_workflow(tmp_path, "flux_quantized.json", 128)
    assert size == (128, 128)
    report = "\n".join(texts)
    assert "diffusion model: torchao:int8wo (flux recipe)" in report and "Warning" not in report
    assert "t5xxl: torchao:int8wo" in report and "clip_l: torchao:int8wo" in report


@pytest.mark.slow
@pytest.mark.both_versions
def test_auraflow_workflow_end_to_end_with_quantized_pile_t5(tmp_path):
    """auraflow_quantized.json: an AuraFlow checkpoint stand-in (MMDiT with one joint and one
    single layer, full width; the whole Pile-T5-XL; SDXL VAE) through Checkpoint Loader.
    Shown able to fail: "pile_t5xl" missing from the text-encoder recipes -> the server
    reports "holds no encoder Quantize Text Encoder knows (it holds pile_t5xl)"."""
    size, texts, _ = _run_workflow(tmp_path, "auraflow_quantized.json", 128)
    assert size == (128, 128)
    report = "\n".join(texts)
    assert "diffusion model: torchao:int8wo (auraflow recipe)" in report and "Warning" not in report
    assert "pile_t5xl: torchao:int8wo" in report


@pytest.mark.slow
def test_pixart_gguf_workflow_on_files_other_tools_wrote(tmp_path):
    """pixart_gguf.json on a PixArt model and a T5 (llama.cpp names) written by gguf-py
    alone: Load GGUF Model and Load GGUF CLIP, sampled through the server.
    Shown able to fail (reasoned, slow server test): is_llama_cpp_t5 in backends/gguf/names.py
    answering False -> the T5's llama.cpp names reach ComfyUI unrenamed and no T5 loads;
    swap_in_quantized not recording the F16 kept layers -> "types F16, Q8_0" is missing."""
    models, standins = tmp_path / "base" / "models", standins_path()
    (models / "diffusion_models").mkdir(parents=True)
    (models / "text_encoders").mkdir(parents=True)
    write_file(models / "diffusion_models" / workflow_builder.GGUF_PIXART,
               lambda: safetensors_items(standins / "diffusion_models" / "qk_pixart_sigma_d2.safetensors"),
               "pixart", quantize=lambda key, t: t.numel() >= 16384 and key.endswith(".weight"))
    write_file(models / "text_encoders" / workflow_builder.GGUF_T5,
               lambda: ((llama_cpp_t5_name(k), t) for k, t in
                        safetensors_items(standins / "text_encoders" / "qk_t5xxl_fp8.safetensors")),
               "t5encoder", quantize=lambda key, t: True)
    size, texts, _ = _run_workflow(tmp_path, "pixart_gguf.json", 320)
    assert size == (320, 320)
    report = "\n".join(texts)
    assert "diffusion model (GGUF file): types F16, Q8_0" in report, report
    assert "text encoders (GGUF file): types" in report and "Q8_0" in report
