"""One registry: format id ("backend:format") -> adapter. Backends register on import;
their libraries are imported only when a format is used."""
from __future__ import annotations

import importlib
import importlib.util
from typing import Dict, List, Optional

import torch

from .base import BackendAdapter, FormatSpec, hardware_problem
from .errors import BackendUnavailable, FormatUnsupported, UnknownFormat

_ADAPTERS: Dict[str, BackendAdapter] = {}


def register(adapter_cls):
    """Class decorator: one line makes a backend known."""
    adapter = adapter_cls()
    if adapter.name in _ADAPTERS:
        raise ValueError(f"backend '{adapter.name}' registered twice")
    _ADAPTERS[adapter.name] = adapter
    return adapter_cls


# The built-in backends, in the order menus list them: name -> module (relative to this package)
BUILTIN_BACKENDS = {"torchao": "..adapters.torchao", "bnb": "..adapters.bnb",
                    "quanto": "..adapters.quanto", "gguf": "..gguf.adapter"}


def adapters() -> Dict[str, BackendAdapter]:
    _load_builtin_backends()
    rank = {name: i for i, name in enumerate(BUILTIN_BACKENDS)}
    return {name: _ADAPTERS[name] for name in sorted(_ADAPTERS, key=lambda n: rank.get(n, len(rank)))}


def all_format_ids() -> List[str]:
    """The formats QuantKit can produce (read-only ones, known from files, left out)."""
    return [spec.id for a in adapters().values() for spec in a.formats.values() if not spec.read_only]


def split_format_id(format_id: str):
    backend, sep, fmt = format_id.partition(":")
    if not sep or not backend or not fmt:
        raise UnknownFormat(f"'{format_id}' is not a format id; expected 'backend:format', "
                            f"for example 'torchao:int8wo' or 'gguf:Q4_K'.")
    return backend, fmt


def get_adapter(backend: str) -> BackendAdapter:
    found = adapters().get(backend)
    if found is None:
        raise UnknownFormat(f"Unknown backend '{backend}'. Known backends: {', '.join(adapters())}.")
    return found


def get_format(format_id: str):
    """(adapter, spec) for 'backend:format', with a clear error for unknown names."""
    backend, fmt = split_format_id(format_id)
    adapter = get_adapter(backend)
    spec = adapter.formats.get(fmt)
    if spec is None:
        raise UnknownFormat(f"Backend '{backend}' has no format '{fmt}'. "
                            f"It offers: {', '.join(adapter.formats)}.")
    return adapter, spec


_IMPORT_CACHE: Dict[str, Optional[str]] = {}


def import_problem(package: str, requirement: str, backend: str) -> Optional[str]:
    if package in _IMPORT_CACHE:
        return _IMPORT_CACHE[package]
    problem = None
    if importlib.util.find_spec(package.split(".")[0]) is None:
        problem = (f"The '{backend}' backend needs the Python package '{requirement}', which is "
                   f"not installed. In ComfyUI's Python run: python -m pip install {requirement}")
    else:
        try:
            importlib.import_module(package)
        except Exception as exc:  # a broken install must not break the whole pack
            problem = (f"The '{backend}' backend could not import '{package}' ({type(exc).__name__}: "
                       f"{exc}). Reinstall it: python -m pip install --force-reinstall {requirement}")
    _IMPORT_CACHE[package] = problem
    return problem


def usable_problem(adapter: BackendAdapter, spec: FormatSpec, device) -> Optional[str]:
    return adapter.missing_package() or hardware_problem(spec, torch.device(device))


def check_usable(adapter: BackendAdapter, fmt: str, device) -> FormatSpec:
    spec = adapter.formats.get(fmt)
    if spec is None:
        raise UnknownFormat(f"Backend '{adapter.name}' has no format '{fmt}'. "
                            f"It offers: {', '.join(adapter.formats)}.")
    missing = adapter.missing_package()
    if missing:
        raise BackendUnavailable(missing)
    hw = hardware_problem(spec, torch.device(device))
    if hw:
        alternatives = [s.id for a in adapters().values() for s in a.formats.values()
                        if s.id != spec.id and not s.read_only and usable_problem(a, s, device) is None
                        and abs(s.bits_per_weight - spec.bits_per_weight) <= 1.5]
        hint = f" Try {' or '.join(repr(a) for a in alternatives[:3])}." if alternatives else ""
        raise FormatUnsupported(hw + hint)
    return spec


_loaded = False


def _load_builtin_backends():
    """Importing a backend module only registers it: the library itself loads on use."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_BACKENDS.values():
        importlib.import_module(module, __package__)
