"""Fit Model to VRAM Budget: MODEL in, a new MODEL out whose layers each take the format
that keeps the estimated output error smallest within a memory budget."""
from __future__ import annotations

import re

import comfy.model_management
import comfy.utils
import torch

from ..backends.engine.errors import BudgetUnreachable, QuantKitError
from ..backends.engine.fit_layers import (check_candidates, default_candidates, fixed_parts,
                                          nominal_smallest)
from ..backends.engine.fit_plan import check_plan_bytes, gib, layer_plan, plan_fit, summary_lines
from ..backends.engine.quantize import QUANTIZABLE, check_exclude
from ..backends.engine.recipes import get_recipe
from .budget_calibration import measure_model
from .clone_and_quantize import QUANTIZE_ON, quantize_patcher, work_device
from .comfy_source_layers import is_layer, is_plain_float
from .quantize_model import detect_family

PERCENT, GIB, THIS_GPU = "% of 16-bit size", "GiB", "this GPU: GiB to leave free"
BUDGET_MODES = [PERCENT, GIB, THIS_GPU]


def check_float_layers(root: torch.nn.Module) -> None:
    """The fit measures and counts plain float Linear/Conv layers; a source whose layers hold
    scaled fp8 or core quantized weights is refused (Quantize Model reads those)."""
    for name, module in root.named_modules():
        weight = getattr(module, "weight", None)
        if not is_layer(module):
            continue
        plain = isinstance(module, QUANTIZABLE) and is_plain_float(weight)
        if not plain or getattr(module, "scale_weight", None) is not None:
            raise QuantKitError(
                f"Layer '{name}' stores its weight as {type(weight).__name__} {weight.dtype}, not "
                f"as plain 16/32-bit floats, and Fit Model to VRAM Budget measures float layers "
                f"only. Load the model from a 16-bit file (weight_dtype 'default'), then fit it.")


def parse_candidates(text: str, device) -> tuple:
    names = tuple(n.strip() for n in re.split(r"[,\s]+", text or "") if n.strip())
    return names or default_candidates(device)


def size_at_16_bits(root: torch.nn.Module) -> int:
    return 2 * sum(p.nelement() for p in root.parameters())


def budget_bytes(model, mode: str, value: float, latent: dict, with_negative: bool) -> tuple:
    """(bytes, words for the report) of the budget the user asked for."""
    if value < 0:
        raise QuantKitError(f"The budget must be 0 or more, got {value}.")
    root = model.model.diffusion_model
    if mode == PERCENT:
        n = int(size_at_16_bits(root) * value / 100)
        return n, f"{value:g}% of the 16-bit size ({gib(n)})"
    if mode == GIB:
        return int(value * 2**30), f"{value:g} GiB"
    if mode != THIS_GPU:
        raise QuantKitError(f"Unknown budget mode '{mode}'. Choose one of: {', '.join(BUDGET_MODES)}.")
    device = torch.device(model.load_device)
    if device.type == "cpu":
        raise QuantKitError("'this GPU' needs a GPU, but ComfyUI runs this model on the CPU. "
                            "Choose 'GiB' or '% of 16-bit size'.")
    shape = list(latent["samples"].shape)
    shape[0] *= 2 if with_negative else 1  # cond and uncond run as one batch
    total = comfy.model_management.get_total_memory(device)
    reserve = comfy.model_management.minimum_inference_memory()
    activations = model.memory_required(shape)
    n = int(total - reserve - activations - value * 2**30)
    words = (f"this GPU: {gib(total)} less ComfyUI's reserve {gib(reserve)}, its activation "
             f"estimate for {shape} {gib(activations)} and {value:g} GiB left free = {gib(n)}")
    if n <= 0:
        raise QuantKitError(f"Nothing is left for the model on this GPU ({words}). Leave less "
                            f"free, use a smaller latent, or choose 'GiB'.")
    return n, words


class FitModelToBudget:
    DESCRIPTION = ("Quantizes the diffusion model to fit a memory budget, choosing a format per "
                   "layer: the mix with the smallest estimated output error that fits. A short "
                   "calibration run measures, for every layer and format, the error the layer's "
                   "quantization adds to the model's output. The input MODEL is not changed; the "
                   "output is a new MODEL. Same model, prompt, latent and budget: same choice.")
    CATEGORY = "QuantKit"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model within the budget. Memory Report shows its formats and the choice.",)
    FUNCTION = "fit"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to fit (left unchanged)."}),
                "positive": ("CONDITIONING", {
                    "tooltip": "A typical prompt for this model. The calibration run samples with "
                               "it; the layer inputs it produces decide which layers need more bits."}),
                "latent": ("LATENT", {
                    "tooltip": "The calibration size (an Empty Latent Image). 512x512 or smaller is "
                               "enough and keeps the run quick and small. In 'this GPU' mode it is "
                               "also the size activations are budgeted for."}),
                "budget_mode": (BUDGET_MODES, {
                    "default": PERCENT,
                    "tooltip": "How 'budget' is read: a percentage of the model's size at 16 bits; "
                               "GiB for the diffusion model's weights; or 'this GPU': the card's "
                               "memory less ComfyUI's reserve and its activation estimate for the "
                               "latent, less 'budget' GiB you keep free (text encoders, VAE)."}),
                "budget": ("FLOAT", {
                    "default": 35.0, "min": 0.0, "max": 1.0e6, "step": 0.01,
                    "tooltip": "The budget, in the unit budget_mode says. Too small to reach: the "
                               "error says the smallest size reachable."}),
            },
            "optional": {
                "negative": ("CONDITIONING", {
                    "tooltip": "A negative prompt: the calibration then runs cond and uncond with "
                               "cfg 4, as sampling does. Without it, cond only."}),
                "steps": ("INT", {
                    "default": 4, "min": 1, "max": 50,
                    "tooltip": "Calibration sampling steps (euler). Layer inputs are sampled over "
                               "them; more steps cost time and change little."}),
                "seed": ("INT", {
                    "default": 0, "min": 0, "max": 0xffffffffffffffff,
                    "tooltip": "Noise seed of the calibration run (fixed: the same choice every time)."}),
                "candidates": ("STRING", {
                    "default": "", "multiline": False,
                    "tooltip": "Formats a layer may take, comma-separated, fastest on this device "
                               "first (ties go to the earlier). Empty: torchao:int8wo (GPU) or "
                               "torchao:int8dq (CPU), then gguf:Q8_0, Q6_K, Q5_K, Q4_K, Q3_K, Q2_K. "
                               "A layer may also stay as it is."}),
                "exclude": ("STRING", {
                    "default": "", "multiline": False,
                    "tooltip": "Regular expression of layer names to keep unquantized, e.g. "
                               "'attn2|proj_out'. Empty: none."}),
                "quantize_on": (QUANTIZE_ON, {
                    "default": "auto",
                    "tooltip": "Where the measuring and quantization math runs. 'cpu' uses no GPU "
                               "memory (much slower: every layer is quantized once per candidate)."}),
            },
        }

    def fit(self, model, positive, latent, budget_mode, budget, negative=None, steps=4, seed=0,
            candidates="", exclude="", quantize_on="auto"):
        check_float_layers(model.model.diffusion_model)
        family = detect_family(model)
        recipe = get_recipe(family)
        device = work_device(quantize_on)
        formats = parse_candidates(candidates, model.load_device)
        check_candidates(formats, model.load_device)
        check_exclude(exclude)
        target, words = budget_bytes(model, budget_mode, budget, latent, negative is not None)
        searched, kept, fixed = fixed_parts(model.model.diffusion_model, recipe, exclude or None)
        least = nominal_smallest(searched, fixed, formats, recipe)
        if least > target:
            raise BudgetUnreachable(least, target, exact=False)

        bar = comfy.utils.ProgressBar(steps + len(searched))
        measured = measure_model(model, positive, negative, latent, steps, seed, formats, recipe,
                                 exclude or None, device,
                                 progress=lambda done, total: bar.update_absolute(done, total))
        plan = plan_fit(measured.layers, kept, fixed, target, measured.output_energy, formats)
        label = f"fit to {words}"
        new_model, reports = quantize_patcher(model, [("diffusion_model", family, "diffusion model")],
                                              label, exclude, quantize_on,
                                              plans={"diffusion_model": layer_plan(plan)})
        check_plan_bytes(plan, reports[0])
        text = "\n".join([reports[0].summary(), *summary_lines(plan, gib)])
        return {"ui": {"text": (text,)}, "result": (new_model,)}
