"""Import a real ComfyUI checkout in-process (CPU only) without its server.

ComfyUI parses sys.argv when comfy.cli_args is first imported, and only when
comfy.options.enable_args_parsing() was called, so both have to happen before any
other `comfy.*` import.
"""
from __future__ import annotations

import os
import sys

_DEFAULT_ARGS = ("--cpu",)


def comfyui_path() -> str:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        raise RuntimeError(
            "COMFYUI_PATH is not set: the stand-in models are built and checked with a real "
            "ComfyUI. Run `source .ci/env.sh` first (it sets COMFYUI_PATH).")
    if not os.path.isfile(os.path.join(path, "comfy", "model_detection.py")):
        raise RuntimeError(f"COMFYUI_PATH={path} is not a ComfyUI checkout (no comfy/model_detection.py).")
    return path


def import_comfy(extra_args: tuple[str, ...] = ()) -> None:
    """Put ComfyUI on sys.path and parse its command line once (idempotent)."""
    if "comfy.cli_args" in sys.modules:
        return
    path = comfyui_path()
    if path not in sys.path:
        # In front: ComfyUI's top-level `nodes`, `utils` must win over same-named folders here.
        sys.path.insert(0, path)
    saved_argv = sys.argv
    sys.argv = ["main.py", *_DEFAULT_ARGS, *extra_args]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses sys.argv now)
    finally:
        sys.argv = saved_argv


def comfyui_version() -> str:
    try:
        with open(os.path.join(comfyui_path(), "comfyui_version.py"), encoding="utf-8") as f:
            for line in f:
                if line.startswith("__version__"):
                    return line.split("=", 1)[1].strip().strip("\"'")
    except OSError:
        pass
    return "unknown"
