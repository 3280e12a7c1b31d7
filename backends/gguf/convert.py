"""Convert a diffusion model's .safetensors checkpoint to a .gguf file, once, from a shell.

    python -m backends.gguf.convert MODEL.safetensors OUT.gguf --type Q8_0 --arch sdxl

(run from the pack's folder, custom_nodes/QuantKit). Layers are chosen as Quantize Model
chooses them (the architecture's recipe, the format's fallbacks); everything else keeps its
float type. The file follows the conventions other GGUF loaders read: ComfyUI's key layout,
`general.architecture` as below, reshaped convolution weights with their shape in
`comfy.gguf.orig_shape.<name>`. Only safetensors is read (nothing is unpickled).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace
from typing import Callable, Dict, Optional

import torch

from ..engine.errors import QuantKitError
from .export import describe, float_entry
from .file import write_gguf
from ..engine.quantize import plan_layer
from ..engine.recipes import RECIPES, get_recipe
from ..engine.registry import get_format
from ..engine.safetensors_file import read_safetensors

# general.architecture (as ComfyUI-GGUF names them) -> the recipe of that family
ARCHITECTURES = {"sd1": "sd15", "sdxl": "sdxl", "sd3": "sd3", "pixart": "pixart",
                 "flux": "flux", "aura": "auraflow"}
# a full checkpoint holds the diffusion model under this prefix (and the VAE, text encoders)
CHECKPOINT_PREFIX = "model.diffusion_model."


def read_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """The diffusion model's tensors of a .safetensors file, in ComfyUI's key layout."""
    def diffusion_model(keys):
        if any(k.startswith(CHECKPOINT_PREFIX) for k in keys):
            return [k for k in keys if k.startswith(CHECKPOINT_PREFIX)]
        return keys
    tensors = read_safetensors(path, diffusion_model)
    return {k.removeprefix(CHECKPOINT_PREFIX): v for k, v in tensors.items()}


def quantized_tensors(state_dict: Dict[str, torch.Tensor], format_id: str, recipe_name: str,
                      progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """name -> (qtype, data, shape) for write_gguf: weights the recipe quantizes in the format
    (or its fallback), all other tensors in their own float type."""
    adapter, spec = get_format(format_id)
    if adapter.name != "gguf":
        raise QuantKitError(f"'{format_id}' is not a GGUF type; choose gguf:Q8_0, gguf:Q4_K or "
                            f"another gguf:* format.")
    recipe = get_recipe(recipe_name)
    out = {}
    for i, (key, tensor) in enumerate(state_dict.items()):
        plan = None
        if key.endswith(".weight") and tensor.dim() >= 2 and tensor.is_floating_point():
            _, plan, _ = plan_layer(key[:-len(".weight")], SimpleNamespace(weight=tensor),
                                    adapter, spec, recipe, None)
        if plan is None:
            out[key] = float_entry(tensor)
        else:
            raw = adapter.quantize(tensor.float(), plan)["weight"]
            out[key] = (plan.name, raw, tuple(tensor.shape))
        if progress is not None:
            progress(i + 1, len(state_dict))
    return out


def convert(src: str, dst: str, qtype: str, arch: str, recipe: Optional[str] = None,
            overwrite: bool = False) -> dict:
    if arch not in ARCHITECTURES:
        raise QuantKitError(f"Unknown architecture '{arch}'; known: {', '.join(ARCHITECTURES)}.")
    if recipe is not None and recipe not in RECIPES:
        raise QuantKitError(f"Unknown recipe '{recipe}'; known: {', '.join(RECIPES)}.")
    if os.path.exists(dst) and not overwrite:
        raise QuantKitError(f"{dst} exists; pass --overwrite to replace it.")
    tensors = quantized_tensors(read_checkpoint(src), f"gguf:{qtype}", recipe or ARCHITECTURES[arch])
    write_gguf(dst, tensors, {"general.name": os.path.splitext(os.path.basename(dst))[0]}, arch=arch)
    return tensors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backends.gguf.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a .safetensors diffusion model or full checkpoint")
    ap.add_argument("dst", help="the .gguf file to write")
    ap.add_argument("--type", default="Q8_0", help="GGUF type: Q8_0, Q6_K, Q5_K, Q4_K, Q4_0, ...")
    ap.add_argument("--arch", required=True, choices=sorted(ARCHITECTURES))
    ap.add_argument("--recipe", default=None, help="layers kept in high precision (default: the arch's)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    try:
        tensors = convert(args.src, args.dst, args.type, args.arch, args.recipe, args.overwrite)
    except QuantKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({os.path.getsize(args.dst) / 2**20:.1f} MiB) in "
          f"{time.perf_counter() - start:.1f} s: {describe(tensors)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
