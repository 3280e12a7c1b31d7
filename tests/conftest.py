"""Test configuration: the pack is imported the way ComfyUI imports it, and real
ComfyUI is available in-process (session fixture `comfy`) and as a server (`server`)."""
from __future__ import annotations

import atexit
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the `harness` package
sys.path.append(str(Path(__file__).resolve().parents[1]))  # `bench` (stand-ins, ComfyUI start-up)

from harness.comfy_inprocess import import_pack, make_base_dir, pack_module_name, start_comfyui  # noqa: E402

BASE_DIR = make_base_dir(Path(tempfile.mkdtemp(prefix="quantkit-comfy-")))
atexit.register(shutil.rmtree, BASE_DIR, True)  # tests write multi-GB model files there
PACK = pack_module_name(BASE_DIR)
import_pack(PACK)  # ComfyUI imports it again under this name: the backends stay the same objects


def pack_module(sub: str):
    """A module of the pack, as ComfyUI loaded it (e.g. 'nodes.comfy_layers')."""
    return importlib.import_module(f"{PACK}.{sub}")


def pytest_configure(config):
    from harness.suite_memory import SuiteMemoryPlugin
    config.pluginmanager.register(SuiteMemoryPlugin(), "quantkit-suite-memory")


def pytest_report_header(config):
    from harness.locations import comfyui_version
    mode = os.environ.get("QUANTKIT_TEST_DEVICE", "cpu")
    args = os.environ.get("QUANTKIT_SERVER_ARGS", "")
    return f"QuantKit under ComfyUI {comfyui_version()} on {mode} {args}".rstrip()


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI's `nodes` module with the pack loaded (fails, never skips, without ComfyUI)."""
    return start_comfyui(BASE_DIR)


@pytest.fixture(scope="session")
def base_dir():
    return BASE_DIR


@pytest.fixture
def unload_models_after_each_test():
    """ComfyUI keeps every model it loaded while RAM lasts; modules that load large text
    encoders use this so that the suite's later modules have the room."""
    yield
    import gc
    import comfy.model_management
    comfy.model_management.unload_all_models()
    gc.collect()
