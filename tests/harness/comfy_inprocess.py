"""ComfyUI imported into the test process, its node registry initialised with the pack
loaded from a custom_nodes folder exactly as ComfyUI loads packs."""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys
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
    "QuantKitFitModelToBudget": "Fit Model to VRAM Budget (QuantKit)",
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


def import_pack(name: str):
    """The pack imported as ComfyUI imports a custom node folder (its __init__.py under
    `name`, ComfyUI's module name for it), so that its backends are the same module objects
    in tests as in ComfyUI. Outside ComfyUI the __init__ registers no nodes."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def start_comfyui(base_dir: Path, extra_args=()):
    """Import ComfyUI (--cpu unless QUANTKIT_TEST_DEVICE=gpu) with our base directory; load
    built-in and our nodes.
    Returns ComfyUI's `nodes` module."""
    # here, not at the top: scripts that only start servers (run_workflow.py) lack `bench`
    from bench.dynamic_vram import dynamic_vram_wanted, enable_dynamic_vram_as_main_does
    from bench.media_stubs import stub_media_modules_if_missing
    root = comfyui_path()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
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
