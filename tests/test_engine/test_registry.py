"""The format registry (engine/registry.py): one lookup with one error for unknown names, a
cheap "Try ..." hint, and built-in backends whose module fails to import reported and
tried again. Pure torch, no ComfyUI."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch.nn as nn

from conftest import PACK, pack_module

registry = pack_module("backends.engine.registry")
errors = pack_module("backends.engine.errors")
quantize = pack_module("backends.engine.quantize")


def test_an_unknown_format_is_one_error_naming_the_known_ids():
    """Every path that looks a format up by name raises UnknownFormat listing the ids.
    Shown able to fail: require_format in engine/base.py listing bare names (`", ".join(
    adapter.formats)`) -> 'torchao:int8wo' is not in the message; `fb = adapter.formats[
    spec.fallback]` restored in engine/quantize.py's plan_layer -> KeyError, not UnknownFormat."""
    with pytest.raises(errors.UnknownFormat, match="torchao:int8wo") as info:
        registry.get_format("torchao:int3")
    assert "int3" in str(info.value)
    torchao = registry.get_adapter("torchao")
    with pytest.raises(errors.UnknownFormat, match="torchao:int8wo"):
        registry.check_usable(torchao, "int3", "cpu")
    bnb = registry.get_adapter("bnb")
    stray = dataclasses.replace(bnb.formats["nf4"], name="nf3")
    with pytest.raises(errors.UnknownFormat, match="bnb:nf4"):
        bnb.quantize(nn.Linear(64, 8).weight.detach(), stray)
    gguf = registry.get_adapter("gguf")
    # a K-quant whose fallback names nothing, on a layer too narrow for its 256-blocks
    broken_fallback = dataclasses.replace(gguf.formats["Q4_K"], fallback="Q9_9")
    recipe = SimpleNamespace(keep=(), final_projection=(), min_params=0)
    with pytest.raises(errors.UnknownFormat, match="gguf:Q4_K"):
        quantize.plan_layer("layer", nn.Linear(100, 8), gguf, broken_fallback, recipe, None)


def test_a_missing_backend_and_unsupported_hardware_keep_their_own_errors(monkeypatch):
    """Shown able to fail: check_usable in engine/registry.py raising UnknownFormat for a
    missing package -> UnknownFormat escapes pytest.raises(BackendUnavailable)."""
    monkeypatch.setattr(registry, "_IMPORT_CACHE", {})
    adapter = registry.get_adapter("quanto")
    monkeypatch.setattr(adapter, "package", "quantkit_no_such_package")
    with pytest.raises(errors.BackendUnavailable, match="optimum-quanto"):
        registry.check_usable(adapter, "int8", "cpu")
    with pytest.raises(errors.FormatUnsupported, match="needs an NVIDIA GPU"):
        registry.check_usable(registry.get_adapter("torchao"), "fp8dq", "cpu")


class _Imports:
    """registry's `importlib`, recording what import_module is asked for."""

    def __init__(self):
        self.names = []
        self.util = importlib.util

    def import_module(self, name, package=None):
        self.names.append(name)
        return importlib.import_module(name, package)


def test_the_try_hint_imports_no_backend_library(monkeypatch):
    """The hint for a format the CPU cannot run names same-size formats it can, without
    importing bitsandbytes or quanto.
    Shown able to fail: _alternatives_hint in engine/registry.py filtering with
    `usable_problem(a, s, device) is None` (the old hint) -> 'bitsandbytes' and
    'optimum.quanto' are in the recorded imports."""
    registry.adapters()  # the backend modules themselves are not what is counted
    recorder = _Imports()
    monkeypatch.setattr(registry, "importlib", recorder)
    monkeypatch.setattr(registry, "_IMPORT_CACHE", {})
    with pytest.raises(errors.FormatUnsupported) as info:
        registry.check_usable(registry.get_adapter("torchao"), "fp8dq", "cpu")
    # not even torchao: fp8dq is written in torch and needs no package
    assert recorder.names == []
    # the same backend's 8-bit formats come first in the menu order (README format list)
    assert "Try 'torchao:int8wo' or 'torchao:int8dq' or 'torchao:fp8wo'." in str(info.value)


def test_the_try_hint_leaves_out_backends_that_are_not_installed(monkeypatch):
    """Shown able to fail: `and installed(a.package)` removed from _alternatives_hint in
    engine/registry.py -> 'bnb:nf4' is offered although bitsandbytes is "not installed"."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, package=None):
        return None if name == "bitsandbytes" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(registry, "_IMPORT_CACHE", {})
    with pytest.raises(errors.FormatUnsupported) as info:
        registry.check_usable(registry.get_adapter("torchao"), "int4wo", "cpu")
    message = str(info.value)
    assert "bnb:" not in message
    # within 1.5 bits of 4.25, in menu order: quanto's int4 (4.25), GGML's blocks of 32 as
    # Q5_0 (22 bytes: 5.5 bits) and Q4_0 (18 bytes: 4.5); Q5_1 (24 bytes: 6.0) is too far
    assert "Try 'quanto:int4' or 'gguf:Q5_0' or 'gguf:Q4_0'." in message


def test_a_subpackage_is_installed_only_if_it_is_there():
    """'optimum.quanto' needs quanto itself, not only the 'optimum' package beside it.
    Shown able to fail: installed() looking up `package.split(".")[0]` (as it did) ->
    'json.quantkit_no_such_module' counts as installed."""
    assert registry.installed("json") and registry.installed("json.decoder")
    assert not registry.installed("json.quantkit_no_such_module")
    assert not registry.installed("quantkit_no_such_package.quanto")  # no parent: no error either


def test_a_package_installed_after_a_failed_check_is_found(tmp_path, monkeypatch):
    """Shown able to fail: import_problem in engine/registry.py caching the failure, as it
    did (`_IMPORT_CACHE[package] = "missing"` before the not-installed return) -> the
    second check still reports the package missing."""
    name = "quantkit_installed_later"
    monkeypatch.setattr(registry, "_IMPORT_CACHE", {})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "pip install demo>=1" in registry.import_problem(name, "demo>=1", "demo")
    (tmp_path / f"{name}.py").write_text("")
    importlib.invalidate_caches()
    try:
        assert registry.import_problem(name, "demo>=1", "demo") is None
    finally:
        sys.modules.pop(name, None)


# the pack's module names hold hyphens (as ComfyUI loads it): import_module, not `from`
_ADAPTER_MODULE = """
import importlib

base = importlib.import_module("PACK.backends.engine.base")
BackendAdapter, FormatSpec = base.BackendAdapter, base.FormatSpec
register = importlib.import_module("PACK.backends.engine.registry").register


@register
class Adapter(BackendAdapter):
    name = "NAME"
    package = "torch"
    formats = {"f": FormatSpec(backend="NAME", name="f", bits_per_weight=8.0, description="test")}

    def quantize(self, weight, spec):
        return {"weight": weight}

    def dequantize(self, parts, spec, shape, dtype):
        return parts["weight"].to(dtype)
"""


def _adapter_module(name: str) -> str:
    return _ADAPTER_MODULE.replace("PACK", PACK).replace("NAME", name)


_FAILING_MODULE = 'raise ImportError("simulated: libcudart.so.12 not found")\n'


@pytest.fixture
def stand_in_backends(tmp_path, monkeypatch):
    """Two stand-in built-in backends around the real ones: 'broken' first (its module
    raises on import), 'late' last (imports fine). Registry state is restored after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.setattr(registry, "_ADAPTERS", dict(registry._ADAPTERS))
    monkeypatch.setattr(registry, "_BROKEN", {})
    monkeypatch.setattr(registry, "BUILTIN_BACKENDS", {"broken": "quantkit_test_broken",
                                                        **registry.BUILTIN_BACKENDS,
                                                        "late": "quantkit_test_late"})
    (tmp_path / "quantkit_test_broken.py").write_text(_FAILING_MODULE)
    (tmp_path / "quantkit_test_late.py").write_text(_adapter_module("late"))
    importlib.invalidate_caches()
    yield tmp_path
    for module in ("quantkit_test_broken", "quantkit_test_late"):
        sys.modules.pop(module, None)


def test_a_backend_that_fails_to_import_is_reported_and_retried(stand_in_backends, caplog):
    """Shown able to fail: (1) `raise` added at the top of the except in _import_backend
    (engine/registry.py) -> ImportError escapes adapters(); (2) its `if _BROKEN.get(name) !=
    reason:` guard removed -> 2 warnings, not 1; (3) `and name not in _BROKEN` added to
    _load_builtin_backends (no retry) -> 'broken:f' stays BackendUnavailable after the fix;
    (4) get_adapter without its _BROKEN branch (`if False:`) -> UnknownFormat ("Unknown
    backend 'broken'") escapes pytest.raises(BackendUnavailable)."""
    with caplog.at_level("WARNING", logger="quantkit"):
        first = registry.adapters()
        second = registry.adapters()
    assert "late" in first and "late" in second and "broken" not in second
    assert {"torchao", "bnb", "quanto", "gguf"} <= set(second)
    reports = [r.getMessage() for r in caplog.records if "'broken'" in r.getMessage()]
    assert len(reports) == 1 and "simulated: libcudart.so.12 not found" in reports[0]
    with pytest.raises(errors.BackendUnavailable, match="simulated: libcudart.so.12 not found"):
        registry.get_format("broken:f")
    # the user installs what was missing; the next lookup imports the module again
    (stand_in_backends / "quantkit_test_broken.py").write_text(_adapter_module("broken"))
    importlib.invalidate_caches()
    adapter, spec = registry.get_format("broken:f")
    assert adapter.name == "broken" and spec.id == "broken:f"
    assert "broken" in registry.adapters() and "broken" not in registry._BROKEN
