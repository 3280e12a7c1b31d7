"""Dynamic VRAM (ComfyUI 0.16+, comfy-aimdo) switched on in a process that imports ComfyUI
instead of running its main.py, as main.py switches it on: used by the tests' in-process
ComfyUI and by the benchmark."""
from __future__ import annotations

import logging


def dynamic_vram_wanted() -> bool:
    """What ComfyUI's main.py decides from the arguments on an NVIDIA GPU (0.16+; False
    before, and on the CPU)."""
    import torch
    import comfy.cli_args
    decide = getattr(comfy.cli_args, "enables_dynamic_vram", None)
    return bool(decide and decide() and torch.version.cuda)  # no device query before aimdo


def enable_dynamic_vram_as_main_does() -> None:
    """main.py turns Dynamic VRAM on (comfy-aimdo) before serving; an in-process ComfyUI
    must do the same, or a GPU run would only ever see the classic patcher."""
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy_aimdo.control
    devices = [(d.index, 0) for d in mm.get_all_torch_devices()]
    if not comfy_aimdo.control.init_devices(devices):
        raise RuntimeError("comfy-aimdo did not initialise: Dynamic VRAM cannot be tested here")
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    logging.info("QuantKit: Dynamic VRAM enabled as ComfyUI's main.py does")
