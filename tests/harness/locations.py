"""Where the real ComfyUI, the stand-in models and the pack are. Set by .ci/env.sh;
a user's own ComfyUI is honoured through COMFYUI_PATH."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


class MissingComfyUI(RuntimeError):
    pass


def comfyui_path() -> Path:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        raise MissingComfyUI("COMFYUI_PATH is not set: run the tests through `bash .ci/test` "
                             "(it installs ComfyUI 0.3.75), or point COMFYUI_PATH at your ComfyUI.")
    p = Path(path)
    if not (p / "main.py").is_file() or not (p / "comfy").is_dir():
        raise MissingComfyUI(f"COMFYUI_PATH={p} is not a ComfyUI checkout (no main.py / comfy/).")
    return p


def standins_path() -> Path:
    default = Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit")) / "standins"
    return Path(os.environ.get("QUANTKIT_STANDINS", default))


def comfyui_version() -> str:
    """The version in ComfyUI's comfyui_version.py ('unknown' for checkouts without one)."""
    try:
        text = (comfyui_path() / "comfyui_version.py").read_text()
    except (OSError, MissingComfyUI):
        return "unknown"
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"
