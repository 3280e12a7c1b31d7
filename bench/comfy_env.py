"""Import a real ComfyUI in-process and load the QuantKit pack from this checkout.

ComfyUI parses its command line once, at the first `comfy.cli_args` import, so the
arguments of a run (--cpu, --reserve-vram, ...) are fixed per process: the low-VRAM part
runs in a process of its own.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import types
from pathlib import Path

from .dynamic_vram import dynamic_vram_wanted, enable_dynamic_vram_as_main_does
from .media_stubs import stub_media_modules_if_missing

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "quantkit_bench_pack"
# Where the device copy carries ComfyUI (the GPU machine has no ComfyUI installed).
CARRIED_COMFYUI = REPO_ROOT / ".device" / "comfyui"


def comfyui_path() -> Path:
    path = os.environ.get("COMFYUI_PATH")
    candidates = [Path(path)] if path else []
    candidates.append(CARRIED_COMFYUI)
    for p in candidates:
        if (p / "comfy" / "model_management.py").is_file():
            return p
    raise RuntimeError("No ComfyUI found: set COMFYUI_PATH (source .ci/env.sh does) or copy a "
                       f"ComfyUI checkout to {CARRIED_COMFYUI}.")


def start(cpu: bool, extra_args=()) -> types.SimpleNamespace:
    """ComfyUI's modules and the pack's, as one namespace. Idempotent per process."""
    root = comfyui_path()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if "comfy.cli_args" not in sys.modules:
        stub_media_modules_if_missing()
        import comfy.options
        comfy.options.enable_args_parsing()
        saved = sys.argv
        sys.argv = ["main.py", *(["--cpu"] if cpu else []), *extra_args]
        try:
            import comfy.cli_args  # noqa: F401  (parses sys.argv now)
        finally:
            sys.argv = saved
        if not cpu and dynamic_vram_wanted():  # as main.py: on by default on NVIDIA since 0.16
            import comfy_aimdo.control
            comfy_aimdo.control.init()
            import comfy.model_management  # noqa: F401
            enable_dynamic_vram_as_main_does()
    logging.getLogger().setLevel(logging.WARNING)
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils
    import nodes as comfy_nodes

    pack = _load_pack()
    return types.SimpleNamespace(
        comfy=sys.modules["comfy"], mm=comfy.model_management, sd=comfy.sd,
        model_patcher=comfy.model_patcher, comfy_nodes=comfy_nodes, pack=pack, root=root)


def _load_pack() -> types.SimpleNamespace:
    """The pack imported as a package, the way ComfyUI imports a custom node folder."""
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_NAME, REPO_ROOT / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)

    def mod(sub):
        return importlib.import_module(f"{PACK_NAME}.{sub}")

    return types.SimpleNamespace(
        registry=mod("backends.engine.registry"), base=mod("backends.engine.base"),
        modules=mod("backends.engine.modules"), gguf_file=mod("backends.gguf.file"),
        gguf_export=mod("backends.gguf.export"), fast_linear=mod("backends.kernels.fast_linear"),
        decode_groups=mod("backends.kernels.decode_groups"), native_export=mod("backends.engine.native_export"),
        recipes=mod("backends.engine.recipes"), storage_census=mod("backends.engine.storage_census"),
        clone_and_quantize=mod("nodes.clone_and_quantize"), load_gguf=mod("nodes.load_gguf"),
        nodes=mod("nodes"))


def versions(env) -> dict:
    import platform

    import torch
    memory = sys.modules.get("comfy.memory_management")  # 0.16+
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "comfyui": _comfyui_version(env.root),
           "dynamic_vram": bool(getattr(memory, "aimdo_enabled", False))}
    from importlib import metadata
    for pkg in ("torchao", "bitsandbytes", "optimum-quanto", "gguf", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _comfyui_version(root: Path) -> str:
    try:
        text = (root / "comfyui_version.py").read_text()
        return text.split("=", 1)[1].strip().strip("\"'\n")
    except (OSError, IndexError):
        return "unknown"


def device_name() -> str:
    import torch
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB)"
    import platform
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} threads)"
