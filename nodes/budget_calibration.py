"""The calibration pass of Fit Model to VRAM Budget, through ComfyUI's public sampler.

It samples a few steps with a float copy of the model (its own modules over the source's
weight storage: the source patcher and its modules are never hooked), recording each
layer's inputs, then replays a few of the diffusion model's calls with gradients
(backends/engine/fit.py). The copy is loaded by ComfyUI like any model (LoRA and other
patches applied) and dropped afterwards; nothing of it stays."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import comfy.model_management
import comfy.sample

from ..backends.engine.budget import LayerChoices
from ..backends.engine.calibration import MAX_ROWS
from ..backends.engine.clone import clone_tree
from ..backends.engine.fit import Calibration, calibrate
from ..backends.engine.fit_layers import fixed_parts, measure_layers
from ..backends.engine.quantize import QUANTIZABLE
from .comfy_patcher import (is_loader_state, new_quantized_patcher, reset_loader_state_defaults,
                            settle_stored_dtypes)

SAMPLER, SCHEDULER = "euler", "normal"
CFG_WITH_NEGATIVE = 4.0  # with a negative prompt: cond and uncond both run, as in use
REPLAYS = 2  # diffusion-model calls replayed with gradients (at the start and halfway)


def calibration_copy(source):
    """A patcher over a new module tree sharing the source's (unpatched) weights."""
    backup = source.backup

    def original(name, data):
        bk = backup.get(name)
        return bk.weight if bk is not None else data

    root = clone_tree(source.model, weight_source=original,
                      drop=lambda attr: is_loader_state(attr) or attr == "quantkit_reports")
    reset_loader_state_defaults(root)
    settle_stored_dtypes(root)  # Dynamic VRAM: a file's fp16/fp32 weights in a bf16 model
    patcher = new_quantized_patcher(source, root)
    patcher.weight_inplace_update = False  # patched weights must never be written into shared storage
    return patcher


def run_calibration(patcher, positive, negative, latent: dict, steps: int, seed: int,
                    step_done: Optional[Callable[[int], None]] = None) -> Calibration:
    """Samples `steps` steps of `latent` with `patcher`, recording its diffusion model's
    layers, then replays REPLAYS of its calls with gradients (on the loaded model)."""
    root = patcher.model.diffusion_model
    layers = {n: m for n, m in root.named_modules() if isinstance(m, QUANTIZABLE)}
    cfg = CFG_WITH_NEGATIVE if negative is not None else 1.0  # 1.0: ComfyUI skips the uncond
    calls_per_step = 2 if negative is not None else 1

    def run():
        image = comfy.sample.fix_empty_latent_channels(patcher, latent["samples"])
        noise = comfy.sample.prepare_noise(image, seed)

        def callback(step, x0, x, total):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if step_done is not None:
                step_done(step + 1)

        comfy.sample.sample(patcher, noise, steps, cfg, SAMPLER, SCHEDULER, positive,
                            negative if negative is not None else positive, image,
                            callback=callback, disable_pbar=True, seed=seed)
        comfy.model_management.load_models_gpu([patcher])  # the replays run on the loaded model

    return calibrate(root, layers, run, rows_per_call=max(8, MAX_ROWS // (steps * calls_per_step)),
                     replays=REPLAYS, replay_every=max(1, steps // REPLAYS))


@dataclass
class Measured:
    layers: List[LayerChoices]  # searched layers with their options
    kept: Dict[str, str]  # layers the recipe or exclude keep -> why
    fixed_bytes: int
    output_energy: float


def measure_model(model, positive, negative, latent: dict, steps: int, seed: int, formats,
                  recipe, exclude: Optional[str], device, progress: Optional[Callable] = None,
                  on_parts=None) -> Measured:
    """Calibration pass, then every searched layer of the diffusion model measured in every
    candidate format. progress(done, total) counts steps, then layers."""
    searched, kept, fixed = fixed_parts(model.model.diffusion_model, recipe, exclude)
    total = steps + len(searched)
    report = progress or (lambda done, n: None)
    copy = calibration_copy(model)
    calibration = run_calibration(copy, positive, negative, latent, steps, seed,
                                  step_done=lambda i: report(i, total))
    copy_layers = dict(copy.model.diffusion_model.named_modules())

    def measured(i, n):
        report(steps + i, total)
        comfy.model_management.throw_exception_if_processing_interrupted()

    # values from the copy as ComfyUI loaded it (patches applied, on its device); sizes and
    # dtypes from the source, as the quantized model will store them
    layers = measure_layers(searched, calibration.rows, calibration.sensitivity, formats, recipe,
                            weight_of=lambda name, module: copy_layers[name].weight.detach(),
                            work_device=device, progress=measured, on_parts=on_parts)
    return Measured(layers, kept, fixed, calibration.output_energy)
