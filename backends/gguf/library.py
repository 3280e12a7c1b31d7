"""gguf-py (the `gguf` package), imported when a .gguf file is first read or written, with
a message saying what to install when it is missing."""
from __future__ import annotations

from ..engine.errors import BackendUnavailable

GGUF_REQUIREMENT = "gguf>=0.10.0"


def gguf_py():
    try:
        import gguf
    except Exception as exc:  # missing or broken install
        raise BackendUnavailable(f"Reading or writing .gguf files needs the Python package "
                                 f"'{GGUF_REQUIREMENT}' ({type(exc).__name__}: {exc}). In "
                                 f"ComfyUI's Python run: python -m pip install "
                                 f"\"{GGUF_REQUIREMENT}\"") from None
    return gguf
