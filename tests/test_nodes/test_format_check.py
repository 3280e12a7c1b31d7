"""The Quantize nodes' format check (nodes/format_check.py) through ComfyUI's own prompt
validation: a saved workflow whose format belongs to a backend that failed to import gets
the registry's reason, not ComfyUI's "Value not in list". How each test was shown able to
fail is in its docstring.
"""
from __future__ import annotations

import asyncio
import sys

import pytest

from conftest import pack_module

registry = pack_module("backends.engine.registry")

NODES = {  # node id -> (its MODEL/CLIP input, a loader that gives one, the loader's inputs)
    "QuantKitQuantizeModel": ("model", "UNETLoader", {"unet_name": "missing.safetensors",
                                                      "weight_dtype": "default"}),
    "QuantKitQuantizeTextEncoder": ("clip", "CLIPLoader", {"clip_name": "missing.safetensors",
                                                           "type": "stable_diffusion"}),
}


@pytest.fixture
def torchao_fails_to_import(monkeypatch, tmp_path):
    """The torchao backend's module raises on import (as a broken install would); the
    registry's state is restored after."""
    (tmp_path / "quantkit_test_broken_torchao.py").write_text(
        'raise ImportError("simulated: a broken install")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    registry.adapters()  # every real backend registered before the copy is taken
    monkeypatch.setattr(registry, "_ADAPTERS", {k: v for k, v in registry._ADAPTERS.items() if k != "torchao"})
    monkeypatch.setattr(registry, "_BROKEN", {})
    monkeypatch.setattr(registry, "BUILTIN_BACKENDS", {**registry.BUILTIN_BACKENDS,
                                                        "torchao": "quantkit_test_broken_torchao"})
    yield
    sys.modules.pop("quantkit_test_broken_torchao", None)


def _node_errors(comfy, class_type, fmt):
    """ComfyUI's validation of a prompt with the node given `fmt`: the node's errors."""
    import execution
    linked, loader, loader_inputs = NODES[class_type]
    node = comfy.NODE_CLASS_MAPPINGS[class_type]
    required = node.INPUT_TYPES()["required"]
    inputs = {name: spec[1].get("default", spec[0][0] if isinstance(spec[0], list) else None)
              for name, spec in required.items() if name != linked}
    prompt = {"1": {"class_type": class_type, "inputs": {**inputs, linked: ["2", 0], "format": fmt}},
              "2": {"class_type": loader, "inputs": loader_inputs},
              "3": {"class_type": "QuantKitMemoryReport",
                    "inputs": {linked: ["1", 0], "label": "", "reset_peak": False}}}
    valid = asyncio.run(execution.validate_prompt("qk-format-check", prompt, None))
    return [e for e in valid[3].get("1", {}).get("errors", []) if e["extra_info"].get("input_name") == "format"]


@pytest.mark.parametrize("class_type", list(NODES))
def test_a_broken_backends_format_gets_the_reason_not_value_not_in_list(comfy, torchao_fails_to_import,
                                                                       class_type):
    """Shown able to fail: VALIDATE_INPUTS removed from nodes/quantize_model.py ->
    [QuantKitQuantizeModel] the error is ComfyUI's "Value not in list"."""
    node = comfy.NODE_CLASS_MAPPINGS[class_type]
    menu = node.INPUT_TYPES()["required"]["format"][0]
    assert "gguf:Q8_0" in menu and not [f for f in menu if f.startswith("torchao:")]
    found = _node_errors(comfy, class_type, "torchao:int8wo")
    assert len(found) == 1, found
    text = f"{found[0]['message']} {found[0]['details']}"
    assert "Value not in list" not in text
    assert "'torchao' backend failed to load" in text and "simulated: a broken install" in text
    assert _node_errors(comfy, class_type, "gguf:Q8_0") == []


@pytest.mark.parametrize("class_type", list(NODES))
def test_an_unknown_format_is_still_refused_before_running(comfy, class_type):
    """Shown able to fail: format_problem returning None for every value -> no error for
    'nosuch:fmt'."""
    found = _node_errors(comfy, class_type, "nosuch:fmt")
    assert len(found) == 1 and "nosuch:fmt" in found[0]["details"], found
    assert "Unknown backend 'nosuch'" in found[0]["details"]
