"""Build (or reuse) random-weight stand-ins for SD1.5, SDXL, SD3, PixArt-Sigma, Flux and AuraFlow files.

    python -m bench.standins.build [--families sd15,sdxl,sd3,sd3_tiny,pixart,flux,auraflow|all] [--out DIR]

DIR defaults to $QUANTKIT_STANDINS and is laid out as a ComfyUI models tree (checkpoints/,
diffusion_models/, text_encoders/, vae/). Every file gets a JSON stamp beside it
(`<file>.stamp.json`: generator version, seed, size); a file whose stamp matches is reused.
Files are streamed to a temporary name and renamed when complete. Tests call
`ensure_standins(families, out_dir)`, which returns {name: path}.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from typing import Callable, Dict, Iterable, Optional

from . import catalog

log = logging.getLogger(__name__)

STAMP_SUFFIX = ".stamp.json"
_DISK_MARGIN = 1 << 30


def default_out_dir() -> str:
    return os.environ.get("QUANTKIT_STANDINS") or os.path.join(
        os.environ.get("QUANTKIT_CACHE") or os.path.expanduser("~/.cache/quantkit"), "standins")


def extra_model_paths_yaml(out_dir: str) -> str:
    """An extra_model_paths.yaml section pointing ComfyUI's loaders at the stand-ins."""
    base = os.path.abspath(out_dir)
    return ("quantkit_standins:\n"
            f"    base_path: {base}\n"
            "    checkpoints: checkpoints\n"
            "    diffusion_models: diffusion_models\n"
            "    text_encoders: text_encoders\n"
            "    vae: vae\n")


def _stamp_path(path: str) -> str:
    return path + STAMP_SUFFIX


def _expected_stamp(standin: catalog.StandIn) -> dict:
    return {"generator": "quantkit-standins", "version": catalog.GENERATOR_VERSION,
            "seed": catalog.SEED, "name": standin.name, "relpath": standin.relpath}


def _read_stamp(path: str) -> Optional[dict]:
    try:
        with open(_stamp_path(path), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_current(standin: catalog.StandIn, path: str) -> bool:
    stamp = _read_stamp(path)
    if stamp is None or not os.path.isfile(path):
        return False
    if any(stamp.get(k) != v for k, v in _expected_stamp(standin).items()):
        return False
    return os.path.getsize(path) == stamp.get("bytes")


def _write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _lock(path: str):
    """Serialise builders of one file across processes (pytest-xdist, two shells)."""
    import fcntl
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def tensor_specs(standin: catalog.StandIn):
    """The file's tensors (names, shapes, stored dtype, how to fill), from ComfyUI's classes."""
    from .safetensors_stream import TensorSpec
    from . import fill
    state_dict = standin.build()
    specs = []
    for key, t in state_dict.items():
        shape = tuple(t.shape)
        if t.is_floating_point():
            specs.append(TensorSpec(key, shape, standin.dtype, fill.init_kind(key, shape), standin.seed_name(key)))
        else:  # literal buffers ComfyUI's conversion creates (CLIP position ids)
            if t.device.type == "meta":
                raise RuntimeError(f"{standin.name}: {key} is a {t.dtype} tensor without values")
            specs.append(TensorSpec(key, shape, t.dtype, "data", key, t.detach().cpu()))
    return state_dict, specs


def _remove_stale_partials(path: str) -> None:
    """Temp files of this output left by a killed run (called with the file's lock held)."""
    folder, base = os.path.split(path)
    for entry in os.listdir(folder):
        if entry.startswith(f".{base}.") and entry.endswith(".partial"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, entry))


def build_one(standin: catalog.StandIn, path: str) -> dict:
    """Generate one file (and its stamp); return the stamp."""
    import torch
    from . import safetensors_stream
    from .comfy_import import comfyui_version
    start = time.monotonic()
    state_dict, specs = tensor_specs(standin)
    if standin.detect is not None:
        from .components import verify_detection
        verify_detection(state_dict, standin.detect, torch.float16)
    del state_dict
    need = sum(s.nbytes for s in specs)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need + _DISK_MARGIN:
        raise RuntimeError(f"{path}: needs {need / 1e9:.2f} GB, only {free / 1e9:.2f} GB free in {folder}. "
                           "Free some space or pass --out to a larger disk.")
    metadata = {"quantkit_standin": standin.name, "generator_version": str(catalog.GENERATOR_VERSION),
                "seed": str(catalog.SEED), "description": f"random weights (not a trained model): {standin.notes}"}
    size = safetensors_stream.write(path, specs, catalog.SEED, metadata)
    stamp = dict(_expected_stamp(standin), bytes=size, tensors=len(specs),
                 parameters=sum(s.numel for s in specs), dtype=str(standin.dtype).replace("torch.", ""),
                 detect=standin.detect, comfyui_version=comfyui_version(),
                 seconds=round(time.monotonic() - start, 1), notes=standin.notes)
    _write_json_atomic(_stamp_path(path), stamp)
    return stamp


def ensure_standins(families: Iterable[str] = ("all",), out_dir: Optional[str] = None,
                    report: Optional[Callable[[str], None]] = None) -> Dict[str, str]:
    """Make sure the stand-ins for `families` exist under `out_dir`; return {name: path}.

    families: names from catalog.FAMILIES, or "all". report: called with one line per file
    (default: logging at INFO level).
    """
    families = families.split(",") if isinstance(families, str) else list(families)
    if "all" in families:
        families = list(catalog.FAMILIES)
    out_dir = os.path.abspath(out_dir or default_out_dir())
    report = report or log.info
    paths: Dict[str, str] = {}
    for standin in catalog.for_families(families):
        path = os.path.join(out_dir, standin.relpath)
        start = time.monotonic()
        with _lock(path):
            _remove_stale_partials(path)
            if is_current(standin, path):
                stamp = _read_stamp(path)
                report(f"reused {standin.relpath:48s} {stamp['bytes'] / 1e9:6.2f} GB "
                       f"{time.monotonic() - start:6.1f} s")
            else:
                stamp = build_one(standin, path)
                report(f"built  {standin.relpath:48s} {stamp['bytes'] / 1e9:6.2f} GB "
                       f"{time.monotonic() - start:6.1f} s")
        paths[standin.name] = path
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.standins.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="all",
                        help=f"comma-separated: {','.join(catalog.FAMILIES)} or all (default: all)")
    parser.add_argument("--out", default=None, help="models tree to fill (default: $QUANTKIT_STANDINS)")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    try:
        ensure_standins(families, args.out, report=lambda line: print(line, flush=True))
    except ValueError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
