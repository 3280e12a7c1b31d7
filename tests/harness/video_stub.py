"""ComfyUI's comfy_api imports PyAV (video types) at import time. The GPU machine has no
PyAV and no network; neither tests nor benchmarks touch video, so an empty stand-in module
is enough there. Never used where PyAV is installed (CI installs it)."""
from __future__ import annotations

import importlib.util
import sys
import types

_MODULES = ("av", "av.container", "av.subtitles", "av.subtitles.stream", "av.video",
            "av.video.frame", "av.audio", "av.audio.frame")


def _stub_attribute(attr: str):
    if attr.startswith("__"):
        raise AttributeError(attr)  # no __file__ etc.: inspect must see a module without source
    return type(attr, (), {})


def stub_video_modules_if_missing() -> None:
    if importlib.util.find_spec("av") is not None:
        return
    for name in _MODULES:
        mod = types.ModuleType(name)
        mod.__path__ = []
        mod.__getattr__ = _stub_attribute
        sys.modules.setdefault(name, mod)
