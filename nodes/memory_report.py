"""Memory Report: what each model takes, in which format, on which device, and the peaks.
Sits anywhere in a graph; whatever is wired passes through unchanged."""
from __future__ import annotations

import logging

from .memory_census import take_snapshot
from .memory_chart import chart_tensor, draw_chart
from .memory_devices import reset_peaks
from .memory_text import report_text

log = logging.getLogger(__name__)


class MemoryReport:
    DESCRIPTION = ("Shows where the memory goes: device and RAM figures with peaks, and for each "
                   "wired or loaded model its size by storage format, on the GPU vs offloaded, and "
                   "the saving against 16 bits. Inputs pass through unchanged, so it can sit inline. "
                   "Reads sizes from the tensors: loads and moves nothing.")
    CATEGORY = "QuantKit"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "LATENT", "IMAGE", "STRING", "IMAGE")
    RETURN_NAMES = ("model", "clip", "vae", "latent", "image", "report", "chart")
    OUTPUT_TOOLTIPS = (
        "The model input, unchanged (nothing when not wired).",
        "The clip input, unchanged (nothing when not wired).",
        "The vae input, unchanged (nothing when not wired).",
        "The latent input, unchanged (nothing when not wired).",
        "The image input, unchanged (nothing when not wired).",
        "The report as text (wire it to Preview as Text, or save it).",
        "The report as a chart: each model's size at 16 bits and now, by storage format, "
        "with the GPU's memory as a line. Preview or save it like any image.",
    )
    FUNCTION = "report"
    OUTPUT_NODE = True  # runs even when none of its outputs is used

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "label": ("STRING", {"default": "", "tooltip": "A title for this report, e.g. 'after "
                                                                 "quantize' (to tell several apart)."}),
                "reset_peak": ("BOOLEAN", {"default": False, "tooltip": "After reading, start the "
                                           "peak counters (GPU allocator, process RAM) again from "
                                           "now, so the next report shows the peak of what runs "
                                           "in between."}),
            },
            "optional": {
                "model": ("MODEL", {"tooltip": "A diffusion model to report on; passed through unchanged."}),
                "clip": ("CLIP", {"tooltip": "Text encoders to report on; passed through unchanged."}),
                "vae": ("VAE", {"tooltip": "A VAE to report on; passed through unchanged."}),
                "latent": ("LATENT", {"tooltip": "A latent to pass through (its size is reported). "
                                                 "Wire it to place the report at that point of the run."}),
                "image": ("IMAGE", {"tooltip": "An image to pass through (its size is reported). "
                                               "Wire it to place the report at that point of the run."}),
            },
        }

    def report(self, label, reset_peak, model=None, clip=None, vae=None, latent=None, image=None):
        snapshot = take_snapshot(label, model=model, clip=clip, vae=vae, latent=latent, image=image)
        if reset_peak:
            reset_peaks()
        text = report_text(snapshot, peaks_reset=reset_peak)
        log.info("%s", text)
        chart = chart_tensor(draw_chart(snapshot))
        return {"ui": {"text": (text,)},
                "result": (model, clip, vae, latent, image, text, chart)}
