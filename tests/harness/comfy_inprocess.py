"""ComfyUI imported into the test process, its node registry initialised with the pack
loaded from a custom_nodes folder exactly as ComfyUI loads packs."""
from __future__ import annotations

import asyncio
import importlib
import logging
import sys
import types
from pathlib import Path

from .locations import REPO_ROOT, comfyui_path

PACK_LINK_NAME = "ComfyUI-QuantKit-under-test"  # not the repo's folder name, on purpose
PACK_NODES = {  # node id -> display name: what users see, and what workflows store
    "QuantKitQuantizeModel": "Quantize Model (QuantKit)",
    "QuantKitQuantizeTextEncoder": "Quantize Text Encoder (QuantKit)",
    "QuantKitLoadGGUF": "Load GGUF Model (QuantKit)",
    "QuantKitLoadGGUFCLIP": "Load GGUF CLIP (QuantKit)",
    "QuantKitMemoryReport": "Memory Report (QuantKit)",
    "QuantKitSaveQuantizedModel": "Save Quantized Model (QuantKit)",
}


def pack_module_name(base_dir: Path) -> str:
    # ComfyUI names a pack module after its path (nodes.load_custom_node)
    return str(base_dir / "custom_nodes" / PACK_LINK_NAME).replace(".", "_x_")


def make_base_dir(base_dir: Path) -> Path:
    """A ComfyUI --base-directory holding only our pack (no other custom nodes)."""
    custom = base_dir / "custom_nodes"
    custom.mkdir(parents=True, exist_ok=True)
    link = custom / PACK_LINK_NAME
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    for sub in ("input", "output", "temp", "user", "models"):
        (base_dir / sub).mkdir(exist_ok=True)
    return base_dir


def register_bare_pack(name: str, alias: str = "quantkit") -> None:
    """Make the pack's backends importable (as `name.backends.*` and `alias.backends.*`,
    the same module objects) without running its __init__ (which needs ComfyUI)."""
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(REPO_ROOT)]
        pkg.__file__ = str(REPO_ROOT / "__init__.py")
        sys.modules[name] = pkg
    sys.modules.setdefault(alias, sys.modules[name])
    for path in sorted((REPO_ROOT / "backends").rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        sub = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        module = importlib.import_module(f"{name}.{sub}")
        sys.modules[f"{alias}.{sub}"] = module


def dynamic_vram_wanted() -> bool:
    """What ComfyUI's main.py decides from the arguments on an NVIDIA GPU (0.16+; False
    before, and on the CPU)."""
    import torch
    import comfy.cli_args
    decide = getattr(comfy.cli_args, "enables_dynamic_vram", None)
    return bool(decide and decide() and torch.version.cuda)  # no device query before aimdo


def enable_dynamic_vram_as_main_does() -> None:
    """main.py turns Dynamic VRAM on (comfy-aimdo) before serving; an in-process ComfyUI
    must do the same, or tests on a GPU would only ever see the classic patcher."""
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy_aimdo.control
    devices = [(d.index, 0) for d in mm.get_all_torch_devices()]
    if not comfy_aimdo.control.init_devices(devices):
        raise RuntimeError("comfy-aimdo did not initialise: Dynamic VRAM cannot be tested here")
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    logging.info("QuantKit tests: Dynamic VRAM enabled as ComfyUI's main.py does")


def start_comfyui(base_dir: Path, extra_args=()):
    """Import ComfyUI (--cpu unless QUANTKIT_TEST_DEVICE=gpu) with our base directory; load
    built-in and our nodes.
    Returns ComfyUI's `nodes` module."""
    root = comfyui_path()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from .media_stubs import stub_media_modules_if_missing
    stub_media_modules_if_missing()
    import comfy.options
    comfy.options.enable_args_parsing()
    saved_argv = sys.argv
    from .comfy_server import device_args
    sys.argv = ["main.py", *device_args(), "--base-directory", str(base_dir), *extra_args]
    try:
        import comfy.cli_args  # noqa: F401  (parses argv once)
        dynamic = dynamic_vram_wanted()
        if dynamic:  # main.py does this before anything touches CUDA
            import comfy_aimdo.control
            comfy_aimdo.control.init()
        import folder_paths  # noqa: F401
        # main.py imports ComfyUI's `utils` package before nodes.py puts comfy/ first on
        # sys.path; imported later, `utils` would be comfy/utils.py and built-in node files
        # that need the package (nodes_images) would fail to import
        import utils.extra_config  # noqa: F401
        import nodes
    finally:
        sys.argv = saved_argv
    if dynamic:
        enable_dynamic_vram_as_main_does()
    logging.getLogger().setLevel(logging.INFO)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    link = base_dir / "custom_nodes" / PACK_LINK_NAME
    ok = asyncio.run(nodes.load_custom_node(str(link)))
    if not ok:
        raise RuntimeError("ComfyUI failed to import the QuantKit pack; see the log above.")
    return nodes
