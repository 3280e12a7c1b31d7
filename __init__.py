"""QuantKit: quantize diffusion models and text encoders inside ComfyUI.

Layout: backends/ is pure torch (engine/, adapters/ one per quantization library, gguf/,
kernels/); nodes/ is the ComfyUI side. Only relative imports: the pack works under any
folder name.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./nodes/web"  # a small frontend extension: report text shown on the nodes

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
