"""Writes the bundled graph-editor workflows (workflows/*.json) from compact graph specs,
laying widget values out the way the frontend does (using ComfyUI's node definitions).

    python -m harness.workflow_builder   (from tests/, with ComfyUI importable)
"""
from __future__ import annotations

import json
from pathlib import Path

from .locations import REPO_ROOT
from .workflow_api import _is_widget

# Each graph: node id -> (class_type, {input: value or ("@", node_id, output_slot)}, title)
PROMPT_POS = "a lighthouse on a cliff at sunset, detailed oil painting"
PROMPT_NEG = "blurry, low quality, watermark, text, jpeg artifacts"


def _sampler(model, pos, neg, latent, steps, cfg, sampler="euler", scheduler="normal"):
    return ("KSampler", {"model": model, "positive": pos, "negative": neg, "latent_image": latent,
                         "seed": 42, "steps": steps, "cfg": cfg, "sampler_name": sampler,
                         "scheduler": scheduler, "denoise": 1.0}, None)


def _report(model, clip, image, label):
    return ("QuantKitMemoryReport", {"model": model, "clip": clip, "image": image,
                                     "label": label, "reset_peak": False}, None)


def _quant_model(model, fmt, recipe="auto"):
    return ("QuantKitQuantizeModel", {"model": model, "format": fmt, "recipe": recipe,
                                      "exclude": "", "quantize_on": "auto"}, None)


def _quant_clip(clip, fmt, encoders="auto"):
    return ("QuantKitQuantizeTextEncoder", {"clip": clip, "format": fmt, "encoders": encoders,
                                            "quantize_on": "auto"}, None)


def L(node, slot=0):
    return ("@", node, slot)


def checkpoint_graph(ckpt, width, height, steps, cfg, model_fmt, clip_fmt, label, encode="CLIPTextEncode",
                     sampler="euler", scheduler="normal"):
    return {
        1: ("CheckpointLoaderSimple", {"ckpt_name": ckpt}, None),
        2: _quant_model(L(1, 0), model_fmt),
        3: _quant_clip(L(1, 1), clip_fmt),
        4: (encode, {"clip": L(3), "text": PROMPT_POS}, "Positive"),
        5: (encode, {"clip": L(3), "text": PROMPT_NEG}, "Negative"),
        6: ("EmptyLatentImage", {"width": width, "height": height, "batch_size": 1}, None),
        7: _sampler(L(2), L(4), L(5), L(6), steps, cfg, sampler, scheduler),
        8: ("VAEDecode", {"samples": L(7), "vae": L(1, 2)}, None),
        9: _report(L(2), L(3), L(8), label),
        10: ("SaveImage", {"images": L(9, 4), "filename_prefix": f"QuantKit_{label}"}, None),
        11: ("SaveImage", {"images": L(9, 6), "filename_prefix": f"QuantKit_{label}_memory"}, "Memory chart"),
    }


GGUF_SD15 = "quantkit/sd15_Q8_0"
GGUF_PIXART, GGUF_T5 = "qk_pixart_sigma_d2_Q8_0.gguf", "qk_t5xxl_Q8_0.gguf"

GRAPHS = {
    "sd15_quantized.json": checkpoint_graph("qk_sd15.safetensors", 512, 512, 20, 7.0,
                                            "torchao:int8wo", "torchao:int8wo", "sd15"),
    "sdxl_quantized.json": checkpoint_graph("qk_sdxl.safetensors", 1024, 1024, 20, 6.0,
                                            "torchao:int8wo", "torchao:int8wo", "sdxl"),
    "sd3_quantized.json": {
        1: ("CheckpointLoaderSimple", {"ckpt_name": "qk_sd3_d2.safetensors"}, None),
        12: ("TripleCLIPLoader", {"clip_name1": "qk_clip_l.safetensors", "clip_name2": "qk_clip_g.safetensors",
                                  "clip_name3": "qk_t5xxl_fp8.safetensors"}, None),
        2: _quant_model(L(1, 0), "torchao:int8wo"),
        3: _quant_clip(L(12), "torchao:int8wo", "auto"),
        4: ("CLIPTextEncode", {"clip": L(3), "text": PROMPT_POS}, "Positive"),
        5: ("CLIPTextEncode", {"clip": L(3), "text": PROMPT_NEG}, "Negative"),
        6: ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, None),
        7: _sampler(L(2), L(4), L(5), L(6), 28, 4.5, "dpmpp_2m", "sgm_uniform"),
        8: ("VAEDecode", {"samples": L(7), "vae": L(1, 2)}, None),
        9: _report(L(2), L(3), L(8), "sd3"),
        10: ("SaveImage", {"images": L(9, 4), "filename_prefix": "QuantKit_sd3"}, None),
        11: ("SaveImage", {"images": L(9, 6), "filename_prefix": "QuantKit_sd3_memory"}, "Memory chart"),
    },
    # quantize once and keep the result: then sd15_gguf.json loads the file
    "sd15_save_gguf.json": {
        1: ("CheckpointLoaderSimple", {"ckpt_name": "qk_sd15.safetensors"}, None),
        2: _quant_model(L(1, 0), "gguf:Q8_0"),
        4: _quant_clip(L(1, 1), "gguf:Q8_0"),
        3: ("QuantKitSaveQuantizedModel", {"model": L(2), "clip": L(4), "filename": GGUF_SD15,
                                           "overwrite": False, "file_format": "gguf"}, None),
    },
    "sd15_gguf.json": {
        1: ("CheckpointLoaderSimple", {"ckpt_name": "qk_sd15.safetensors"}, "VAE"),
        2: ("QuantKitLoadGGUF", {"gguf_name": GGUF_SD15 + ".gguf"}, None),
        3: ("QuantKitLoadGGUFCLIP", {"clip_name1": GGUF_SD15 + "_clip_l.gguf", "type": "stable_diffusion",
                                     "clip_name2": "none", "clip_name3": "none"}, None),
        4: ("CLIPTextEncode", {"clip": L(3), "text": PROMPT_POS}, "Positive"),
        5: ("CLIPTextEncode", {"clip": L(3), "text": PROMPT_NEG}, "Negative"),
        6: ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, None),
        7: _sampler(L(2), L(4), L(5), L(6), 20, 7.0),
        8: ("VAEDecode", {"samples": L(7), "vae": L(1, 2)}, None),
        9: _report(L(2), L(3), L(8), "sd15_gguf"),
        10: ("SaveImage", {"images": L(9, 4), "filename_prefix": "QuantKit_sd15_gguf"}, None),
        11: ("SaveImage", {"images": L(9, 6), "filename_prefix": "QuantKit_sd15_gguf_memory"}, "Memory chart"),
    },
    # GGUF files as other tools write them: a PixArt model and a T5 (any type Load GGUF reads)
    "pixart_gguf.json": {
        1: ("QuantKitLoadGGUF", {"gguf_name": GGUF_PIXART}, None),
        12: ("QuantKitLoadGGUFCLIP", {"clip_name1": GGUF_T5, "type": "pixart", "clip_name2": "none",
                                      "clip_name3": "none"}, None),
        13: ("VAELoader", {"vae_name": "qk_sdxl_vae.safetensors"}, None),
        4: ("CLIPTextEncodePixArtAlpha", {"clip": L(12), "text": PROMPT_POS, "width": 1024, "height": 1024}, "Positive"),
        5: ("CLIPTextEncodePixArtAlpha", {"clip": L(12), "text": PROMPT_NEG, "width": 1024, "height": 1024}, "Negative"),
        6: ("EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, None),
        7: _sampler(L(1), L(4), L(5), L(6), 20, 4.5),
        8: ("VAEDecode", {"samples": L(7), "vae": L(13)}, None),
        9: _report(L(1), L(12), L(8), "pixart_gguf"),
        10: ("SaveImage", {"images": L(9, 4), "filename_prefix": "QuantKit_pixart_gguf"}, None),
        11: ("SaveImage", {"images": L(9, 6), "filename_prefix": "QuantKit_pixart_gguf_memory"}, "Memory chart"),
    },
    "pixart_quantized.json": {
        1: ("UNETLoader", {"unet_name": "qk_pixart_sigma_d2.safetensors", "weight_dtype": "default"}, None),
        12: ("CLIPLoader", {"clip_name": "qk_t5xxl_fp8.safetensors", "type": "pixart", "device": "default"}, None),
        13: ("VAELoader", {"vae_name": "qk_sdxl_vae.safetensors"}, None),
        2: _quant_model(L(1), "torchao:int8wo"),
        3: _quant_clip(L(12), "torchao:int8wo", "t5xxl"),
        4: ("CLIPTextEncodePixArtAlpha", {"clip": L(3), "text": PROMPT_POS, "width": 1024, "height": 1024}, "Positive"),
        5: ("CLIPTextEncodePixArtAlpha", {"clip": L(3), "text": PROMPT_NEG, "width": 1024, "height": 1024}, "Negative"),
        6: ("EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, None),
        7: _sampler(L(2), L(4), L(5), L(6), 20, 4.5),
        8: ("VAEDecode", {"samples": L(7), "vae": L(13)}, None),
        9: _report(L(2), L(3), L(8), "pixart"),
        10: ("SaveImage", {"images": L(9, 4), "filename_prefix": "QuantKit_pixart"}, None),
        11: ("SaveImage", {"images": L(9, 6), "filename_prefix": "QuantKit_pixart_memory"}, "Memory chart"),
    },
    # FLUX.1 [dev] as its files come: the model, CLIP-L + T5-XXL, the 16-channel VAE. Guidance is
    # an input of the model (FluxGuidance), so cfg is 1 and the negative prompt is unused.
    "flux_quantized.json": {
        1: ("UNETLoader", {"unet_name": "qk_flux_d1.safetensors", "weight_dtype": "default"}, None),
        12: ("DualCLIPLoader", {"clip_name1": "qk_clip_l.safetensors", "clip_name2": "qk_t5xxl_fp8.safetensors",
                                "type": "flux", "device": "default"}, None),
        13: ("VAELoader", {"vae_name": "qk_sd3_vae.safetensors"}, None),
        2: _quant_model(L(1), "torchao:int8wo"),
        3: _quant_clip(L(12), "torchao:int8wo", "auto"),
        4: ("CLIPTextEncode", {"clip": L(3), "text": PROMPT_POS}, "Positive"),
        14: ("FluxGuidance", {"conditioning": L(4), "guidance": 3.5}, None),
        5: ("ConditioningZeroOut", {"conditioning": L(4)}, "Negative (unused at cfg 1)"),
        6: ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, None),
        7: _sampler(L(2), L(14), L(5), L(6), 20, 1.0, "euler", "simple"),
        8: ("VAEDecode", {"samples": L(7), "vae": L(13)}, None),
        9: _report(L(2), L(3), L(8), "flux"),
        10: ("SaveImage", {"images": L(9, 4), "filename_prefix": "QuantKit_flux"}, None),
        11: ("SaveImage", {"images": L(9, 6), "filename_prefix": "QuantKit_flux_memory"}, "Memory chart"),
    },
    # AuraFlow ships as one checkpoint: MMDiT, Pile-T5-XL and the SDXL VAE.
    "auraflow_quantized.json": checkpoint_graph("qk_auraflow_d2.safetensors", 1024, 1024, 25, 3.5,
                                                "torchao:int8wo", "torchao:int8wo", "auraflow",
                                                sampler="uni_pc", scheduler="normal"),
}


# What each bundled workflow is. ComfyUI's Templates browser (frontends 1.32 and 1.49) titles
# a custom node's template with its file name and reads no index or field for more, so the
# title and description travel inside the workflow as a note, as ComfyUI's own templates do;
# .ci/workflow_thumbnails.py draws the title on the thumbnail.
TEMPLATES = {
    "sd15_quantized.json": (
        "SD1.5, quantized", "An SD1.5 checkpoint with its UNet and CLIP-L quantized to int8 "
        "(torchao:int8wo), sampled, and the Memory Report: the bytes saved beside the image. "
        "Try other formats in the Quantize nodes' menus."),
    "sdxl_quantized.json": (
        "SDXL, quantized", "An SDXL checkpoint with its UNet and text encoders quantized to int8 "
        "(Quantize Text Encoder's 'auto' keeps CLIP-G, which quantizes badly), sampled at "
        "1024x1024, and the Memory Report."),
    "sd3_quantized.json": (
        "SD3, quantized", "An SD3 checkpoint with CLIP-L, CLIP-G and T5-XXL from Triple CLIP "
        "Loader; the MMDiT and the text encoders (CLIP-G kept) quantized to int8, sampled, and the "
        "Memory Report."),
    "sd15_save_gguf.json": (
        "SD1.5 to .gguf files", "Quantizes SD1.5's UNet and CLIP-L to GGUF Q8_0 and saves them as "
        f"{GGUF_SD15}.gguf (models/diffusion_models) and {GGUF_SD15}_clip_l.gguf "
        "(models/text_encoders): run it once, then open 'sd15_gguf'."),
    "sd15_gguf.json": (
        "SD1.5 from .gguf files", "Loads the files 'sd15_save_gguf' wrote with Load GGUF Model and "
        "Load GGUF CLIP (the VAE from the checkpoint), samples, and shows the Memory Report: the "
        "file's bytes are what sits in memory."),
    "pixart_quantized.json": (
        "PixArt-Sigma, quantized", "A PixArt-Sigma diffusion model and its T5-XXL text encoder "
        "quantized to int8 (torchao:int8wo), sampled at 1024x1024 with the SDXL VAE, and the "
        "Memory Report."),
    "pixart_gguf.json": (
        "PixArt-Sigma from .gguf files", f"A PixArt-Sigma model ({GGUF_PIXART}) and a T5-XXL "
        f"({GGUF_T5}) read from .gguf files as ComfyUI-GGUF's and llama.cpp's tools write them, "
        "with the SDXL VAE; the Memory Report lists the GGUF types read."),
    "flux_quantized.json": (
        "Flux, quantized", "FLUX.1 [dev] from its files (diffusion model, CLIP-L + T5-XXL from "
        "Dual CLIP Loader, the 16-channel VAE); the transformer and both text encoders quantized "
        "to int8 (torchao:int8wo), sampled with FluxGuidance at cfg 1, and the Memory Report."),
    "auraflow_quantized.json": (
        "AuraFlow, quantized", "An AuraFlow checkpoint (MMDiT, Pile-T5-XL text encoder, SDXL VAE) "
        "with its MMDiT and Pile-T5 quantized to int8 (torchao:int8wo), sampled at 1024x1024, "
        "and the Memory Report."),
}
NOTE_TYPE = "MarkdownNote"  # a frontend-only node: never sent to the server

def build(graph: dict, object_info: dict) -> dict:
    nodes, links = [], []
    outputs_links = {}
    order = list(graph)
    for index, node_id in enumerate(order):
        kind, values, title = graph[node_id]
        info = object_info[kind]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        names = info.get("input_order", {}).get("required", []) + info.get("input_order", {}).get("optional", [])
        inputs, widgets = [], []
        for name in names:
            spec = specs[name]
            value = values.get(name)
            is_link = isinstance(value, tuple) and value[0] == "@"
            if _is_widget(spec):
                if is_link:
                    raise ValueError(f"{kind}.{name}: linking widget inputs is not supported here")
                if value is None:
                    value = spec[1].get("default") if len(spec) > 1 else None
                widgets.append(value)
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    widgets.append("fixed")
                continue
            entry = {"name": name, "type": spec[0], "link": None}
            if is_link:
                link_id = len(links) + 1
                src, slot = value[1], value[2]
                src_type = object_info[graph[src][0]]["output"][slot]
                links.append([link_id, src, slot, node_id, len(inputs), src_type])
                outputs_links.setdefault((src, slot), []).append(link_id)
                entry["link"] = link_id
            elif name in info["input"].get("required", {}):
                raise ValueError(f"{kind}: required input '{name}' is not connected")
            inputs.append(entry)
        node = {"id": node_id, "type": kind, "pos": [60 + 340 * (index % 4), 80 + 360 * (index // 4)],
                "size": [320, 200], "flags": {}, "order": index, "mode": 0, "inputs": inputs,
                "outputs": [], "properties": {"Node name for S&R": kind}, "widgets_values": widgets}
        if title:
            node["title"] = title
        nodes.append(node)
    for node in nodes:
        info = object_info[node["type"]]
        for slot, (otype, oname) in enumerate(zip(info["output"], info["output_name"])):
            node["outputs"].append({"name": oname, "type": otype, "slot_index": slot,
                                    "links": outputs_links.get((node["id"], slot), [])})
    return {"last_node_id": max(graph), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"quantkit": "bundled workflow"}, "version": 0.4}


def template_note(name: str, node_id: int, order: int) -> dict:
    if name not in TEMPLATES:
        raise ValueError(f"{name}: add its title and description to TEMPLATES in {Path(__file__).name}")
    title, description = TEMPLATES[name]
    return {"id": node_id, "type": NOTE_TYPE, "pos": [60, -160], "size": [1340, 160], "flags": {},
            "order": order, "mode": 0, "inputs": [], "outputs": [], "properties": {},
            "widgets_values": [f"## {title}\n\n{description}"]}


def workflow(name: str, object_info: dict) -> dict:
    """The bundled workflow `name`: its graph, and a note with its title and description."""
    built = build(GRAPHS[name], object_info)
    note_id = built["last_node_id"] + 1
    built["nodes"].append(template_note(name, note_id, len(built["nodes"])))
    built["last_node_id"] = note_id
    return built


def write_all(object_info: dict, out_dir: Path = REPO_ROOT / "workflows") -> list:
    written = []
    for name in GRAPHS:
        path = out_dir / name
        path.write_text(json.dumps(workflow(name, object_info), indent=1) + "\n")
        written.append(path)
    return written
