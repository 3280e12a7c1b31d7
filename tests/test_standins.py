"""The stand-in files can be built with the ComfyUI under test: each diffusion model's tensors
are what this ComfyUI detects as the intended family and builds from the detected config.

Runs on both ComfyUI versions (meta tensors only, a few seconds). It failed on 0.33 before
`components.checkpoint` passed the UNet's state dict that 0.33's `state_dict_for_saving`
takes first: the CLIP tensors landed under `model.diffusion_model.` and detection found none.
"""
from __future__ import annotations

import pytest
import torch

from bench.standins import build, catalog
from bench.standins.components import verify_detection

DETECTED = [s for s in catalog.STANDINS if s.detect is not None]


@pytest.mark.parametrize("standin", DETECTED, ids=[s.name for s in DETECTED])
def test_standin_is_detected_as_its_family(comfy, standin):
    """Shown able to fail: SD15_UNET's context_dim 768 -> 1024 in bench/standins/components.py
    -> "ComfyUI detects none, expected SD15" (verify_detection raises)."""
    state_dict, specs = build.tensor_specs(standin)
    verify_detection(state_dict, standin.detect, torch.float16)
    assert len(specs) == len(state_dict)
