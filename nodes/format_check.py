"""The check of the Quantize nodes' `format` input (their VALIDATE_INPUTS).

The menu lists the formats of the backends that imported. A saved workflow keeps its format
when a backend's module fails to import; ComfyUI's own check would then say only "Value not
in list", so the nodes check the value themselves and the registry says what failed and why.
"""
from __future__ import annotations

from typing import Optional

from ..backends.engine.errors import QuantKitError
from ..backends.engine.registry import get_format


def format_problem(format_id) -> Optional[str]:
    """Why `format_id` cannot be used, or None (also for a value linked from another node,
    which arrives only when the graph runs)."""
    if not isinstance(format_id, str):
        return None
    try:
        get_format(format_id)
    except QuantKitError as exc:
        return f"format '{format_id}': {exc}"
    return None
