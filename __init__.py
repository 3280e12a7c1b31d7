"""QuantKit: quantize diffusion models and text encoders inside ComfyUI.

Layout: backends/ is pure torch (engine/, adapters/ one per quantization library, gguf/,
kernels/); nodes/ is the ComfyUI side. Only relative imports: the pack works under any
folder name. Imported outside ComfyUI (scripts, tests, the benchmark), it registers no
nodes and imports nothing from nodes/, so its backends import anywhere.
"""
import sys

WEB_DIRECTORY = "./nodes/web"  # a small frontend extension: report text shown on the nodes

# ComfyUI has imported `comfy` before it loads any custom node. A `comfy` that could merely
# be imported is not ComfyUI running: importing nodes/ then would start its model management.
if "comfy" in sys.modules:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
