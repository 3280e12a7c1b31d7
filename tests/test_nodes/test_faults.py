"""Faults while quantizing, through real ComfyUI in-process: ComfyUI's interrupt (what its
Cancel button and POST /interrupt set) stops Quantize Model and Quantize Text Encoder
between layers; an out-of-memory error names a route that needs less memory. Either way
the input is left bit for bit as it was and still runs, and the next run gives the normal
result. (The same through a real server: test_comfy_server_soak.py.)"""
from __future__ import annotations

import pytest
import torch

from conftest import pack_module
from harness.standin_clips import PROMPTS, encode, load_family_clip
from harness.state_hash import state_digest
from harness.tiny_models import denoise, sd3_inputs, tiny_sd3_patcher

registry = pack_module("backends.engine.registry")
errors = pack_module("backends.engine.errors")
quantize_mod = pack_module("backends.engine.quantize")

FMT = "gguf:Q4_0"


@pytest.fixture(scope="module")
def tiny(comfy):
    patcher = tiny_sd3_patcher()
    inputs = sd3_inputs()
    return patcher, inputs, denoise(patcher, inputs), state_digest(patcher)


@pytest.fixture(scope="module")
def clip_l(comfy):
    clip = load_family_clip("sd15")
    return clip, encode(clip, PROMPTS[0]), state_digest(clip)


def run(comfy, node_id, source, fmt):
    """Quantize Model (recipe auto) or Quantize Text Encoder (encoders auto)."""
    return comfy.NODE_CLASS_MAPPINGS[node_id]().quantize(source, fmt, "auto")["result"][0]


def count_quantize_calls(monkeypatch, backend: str, fail_at=None, error=None):
    """Counts the backend's per-layer quantize calls; raises `error` at call `fail_at`
    (set calls["fail_at"] = None to stop failing)."""
    cls = type(registry.get_adapter(backend))
    original, calls = cls.quantize, {"n": 0, "fail_at": fail_at}

    def counted(self, weight, spec):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise error
        return original(self, weight, spec)

    monkeypatch.setattr(cls, "quantize", counted)
    return calls


@pytest.fixture
def cancel_at_first_progress(monkeypatch):
    """A progress-bar hook that presses Cancel when the first layer is done and, unlike
    the server's hook, does not check the flag itself: only the node's own check can stop it."""
    from comfy import model_management as mm, utils as comfy_utils
    seen = []

    def hook(value, total, preview=None, prompt_id=None, node_id=None):
        seen.append(value)
        if len(seen) == 1:
            mm.interrupt_current_processing(True)

    monkeypatch.setattr(comfy_utils, "PROGRESS_BAR_HOOK", hook)
    yield seen
    mm.interrupt_current_processing(False)


@pytest.mark.parametrize("node_id", ["QuantKitQuantizeModel", "QuantKitQuantizeTextEncoder"])
def test_interrupt_stops_quantizing_after_the_current_layer(comfy, tiny, clip_l, node_id, monkeypatch,
                                                            cancel_at_first_progress):
    """Shown able to fail: without the throw_exception_if_processing_interrupted() call in
    nodes/clone_and_quantize.py's progress callback, no exception is raised and all
    layers are quantized (DID NOT RAISE)."""
    from comfy import model_management as mm, utils as comfy_utils
    if node_id == "QuantKitQuantizeModel":
        source, reference, digest = tiny[0], tiny[2], tiny[3]
        output = lambda obj: denoise(obj, tiny[1])  # noqa: E731
    else:
        source, (reference, _), digest = clip_l
        output = lambda obj: encode(obj, PROMPTS[0])[0]  # noqa: E731

    hook = comfy_utils.PROGRESS_BAR_HOOK
    monkeypatch.setattr(comfy_utils, "PROGRESS_BAR_HOOK", None)
    calls = count_quantize_calls(monkeypatch, "gguf")
    expected = state_digest(run(comfy, node_id, source, FMT))  # the normal result
    layers_in_a_full_run, calls["n"] = calls["n"], 0
    assert layers_in_a_full_run >= 30
    monkeypatch.setattr(comfy_utils, "PROGRESS_BAR_HOOK", hook)

    with pytest.raises(mm.InterruptProcessingException):
        run(comfy, node_id, source, FMT)
    assert calls["n"] <= 1, "stops after the layer it was on when Cancel came (the first may be kept)"
    assert not mm.processing_interrupted(), "the interrupt is consumed, as ComfyUI's own check does"

    assert state_digest(source) == digest, "the input is unchanged"
    assert torch.equal(output(source), reference), "the input still runs as before"
    monkeypatch.setattr(comfy_utils, "PROGRESS_BAR_HOOK", None)
    assert state_digest(run(comfy, node_id, source, FMT)) == expected, "the next run is normal"


CPU_OOM = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
                       "allocate memory: you tried to allocate 2147483648 bytes. Error code 12 "
                       "(Cannot allocate memory)")
CUDA_OOM = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("error", [CPU_OOM, CUDA_OOM, MemoryError()], ids=["cpu", "cuda", "python"])
def test_out_of_memory_names_a_lower_memory_route_and_leaves_upstream_usable(comfy, tiny, monkeypatch, error):
    """Shown able to fail: with _is_oom back to matching only 'out of memory', the CPU
    allocator's message ("can't allocate memory") and MemoryError fell through to the
    generic 'failed' error (no match for 'smaller format')."""
    patcher, inputs, reference, digest = tiny
    normal = state_digest(run(comfy, "QuantKitQuantizeModel", patcher, "torchao:int8wo"))
    calls = count_quantize_calls(monkeypatch, "torchao", fail_at=5, error=error)
    # Here the math runs on the CPU, so the advice is about RAM, whatever the error's type.
    with pytest.raises(errors.QuantKitError, match=r"(?s)Ran out of memory on cpu.*input model is "
                                                   r"unchanged.*smaller format.*Load GGUF Model"):
        run(comfy, "QuantKitQuantizeModel", patcher, "torchao:int8wo")
    assert calls["n"] == 5
    assert state_digest(patcher) == digest
    assert torch.equal(denoise(patcher, inputs), reference), "the input model still runs as before"
    calls["fail_at"] = None  # the next run does not fail
    assert state_digest(run(comfy, "QuantKitQuantizeModel", patcher, "torchao:int8wo")) == normal


def test_out_of_memory_on_a_gpu_points_to_quantize_on_cpu():
    """The GPU branch of the advice (this CPU suite cannot run out of GPU memory for real).
    Shown able to fail: returning the RAM advice for every device fails the first assert."""
    advice = quantize_mod.out_of_memory_advice(torch.device("cuda", 0))
    assert "'quantize_on' to 'cpu'" in advice
    assert "'quantize_on'" not in quantize_mod.out_of_memory_advice("cpu"), "already on the CPU"
