"""ComfyUI imports PyAV (video types, comfy_api) and, since 0.16, torchaudio (comfy.sd)
at import time, and which submodules it imports changes between versions. Neither tests
nor benchmarks touch video or audio, so where a package is not installed (PyAV on the GPU
machine; torchaudio, which has no build for the CPU suite's torch) a stand-in for it and
any submodule is enough. A package that is installed is always used as it is."""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


class _StubType(type):
    """A stand-in class whose class attributes are stand-ins too (enum members such as
    av.video.reformatter.ColorTrc.ARIB_STD_B67 are read at import time)."""

    def __getattr__(cls, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _StubType(attr, (), {})


def _stub_attribute(attr: str):
    if attr.startswith("__"):
        raise AttributeError(attr)  # no __file__ etc.: inspect must see a module without source
    return _StubType(attr, (), {})


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []
        mod.__getattr__ = _stub_attribute
        return mod

    def exec_module(self, module):
        pass


class _StubFinder(importlib.abc.MetaPathFinder):
    def __init__(self, package: str):
        self.package = package

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.package or fullname.startswith(self.package + "."):
            return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)
        return None


STUBBED_IF_MISSING = ("av", "torchaudio")


def stub_media_modules_if_missing() -> None:
    for package in STUBBED_IF_MISSING:
        if importlib.util.find_spec(package) is None:
            sys.meta_path.append(_StubFinder(package))
