"""One registry: format id ("backend:format") -> adapter. Backends register on import;
their libraries are imported only when a format is used."""
from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Dict, List, Optional

import torch

from .base import BackendAdapter, FormatSpec, hardware_problem, require_format
from .errors import BackendUnavailable, FormatUnsupported, UnknownFormat

_ADAPTERS: Dict[str, BackendAdapter] = {}
_BROKEN: Dict[str, str] = {}  # built-in backend -> why its module failed to import

log = logging.getLogger("quantkit")


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
    _load_builtin_backends(BUILTIN_BACKENDS)
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
    _load_builtin_backends([backend])
    found = _ADAPTERS.get(backend)
    if found is not None:
        return found
    if backend in _BROKEN:
        raise BackendUnavailable(f"The '{backend}' backend failed to load ({_BROKEN[backend]}); its "
                                 f"formats cannot be used until it imports. Fix or reinstall what "
                                 f"the error names; QuantKit tries again on the next use.")
    raise UnknownFormat(f"Unknown backend '{backend}'. Known backends: {', '.join(adapters())}.")


def get_format(format_id: str):
    """(adapter, spec) for 'backend:format', with a clear error for unknown names."""
    backend, fmt = split_format_id(format_id)
    adapter = get_adapter(backend)
    return adapter, require_format(adapter, fmt)


_IMPORT_CACHE: Dict[str, Optional[str]] = {}  # successes only: a failure is checked again next time


def installed(package: str) -> bool:
    """Whether `package` can be found, without importing it (a dotted name imports its
    parent package only: 'optimum.quanto' is not installed by 'optimum' alone)."""
    try:
        return importlib.util.find_spec(package) is not None
    except ImportError:  # the parent package is missing
        return False


def import_problem(package: str, requirement: str, backend: str) -> Optional[str]:
    if package in _IMPORT_CACHE:
        return _IMPORT_CACHE[package]
    if not installed(package):
        return (f"The '{backend}' backend needs the Python package '{requirement}', which is "
                f"not installed. In ComfyUI's Python run: python -m pip install {requirement}")
    try:
        importlib.import_module(package)
    except Exception as exc:  # a broken install must not break the whole pack
        return (f"The '{backend}' backend could not import '{package}' ({type(exc).__name__}: "
                f"{exc}). Reinstall it: python -m pip install --force-reinstall {requirement}")
    _IMPORT_CACHE[package] = None
    return None


def usable_problem(adapter: BackendAdapter, spec: FormatSpec, device) -> Optional[str]:
    return adapter.missing_package(spec) or hardware_problem(spec, torch.device(device))


def check_usable(adapter: BackendAdapter, fmt: str, device) -> FormatSpec:
    spec = require_format(adapter, fmt)
    missing = adapter.missing_package(spec)
    if missing:
        raise BackendUnavailable(missing)
    hw = hardware_problem(spec, torch.device(device))
    if hw:
        raise FormatUnsupported(hw + _alternatives_hint(spec, device))
    return spec


def _alternatives_hint(spec: FormatSpec, device) -> str:
    """' Try ...' with up to three formats of about the same size that this device runs.
    Cheap: the hardware is checked first and packages are found, not imported."""
    alternatives = [s.id for a in adapters().values() for s in a.formats.values()
                    if s.id != spec.id and not s.read_only
                    and abs(s.bits_per_weight - spec.bits_per_weight) <= 1.5
                    and hardware_problem(s, torch.device(device)) is None and (not s.needs_package or installed(a.package))]
    return f" Try {' or '.join(repr(a) for a in alternatives[:3])}." if alternatives else ""


def _load_builtin_backends(names):
    """Imports the built-in backends among `names` not yet registered. A module that fails
    is logged once per distinct reason and tried again on the next lookup (the user may
    have installed what it lacked); the other backends register regardless."""
    for name in names:
        if name in BUILTIN_BACKENDS and name not in _ADAPTERS:
            _import_backend(name)


def _import_backend(name: str) -> None:
    try:
        importlib.import_module(BUILTIN_BACKENDS[name], __package__)
    except Exception as exc:  # noqa: BLE001 (one broken backend must not hide the others)
        _ADAPTERS.pop(name, None)  # registered before the module failed: not usable
        reason = f"{type(exc).__name__}: {exc}"
        if _BROKEN.get(name) != reason:
            log.warning("QuantKit: the '%s' backend failed to load (%s); its formats are "
                        "unavailable until it imports.", name, reason)
        _BROKEN[name] = reason
        return
    _BROKEN.pop(name, None)
