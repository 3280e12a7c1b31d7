"""Run a bundled workflow headless through a real ComfyUI server and print its memory report.

    python tests/harness/run_workflow.py --workflow workflows/sd15_quantized.json [--as-is]

By default the image size and step count are reduced so a CPU finishes in minutes;
--as-is runs the workflow exactly as saved.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.comfy_server import ComfyServer  # noqa: E402
from harness.workflow_api import to_api  # noqa: E402

SIZE_INPUTS = ("width", "height")
# Keep a 24 GB machine's RAM in bounds: SDXL's UNet in bf16, PixArt's T5 stored as fp8.
SERVER_ARGS = {"sdxl": ["--bf16-unet"], "pixart": ["--fp8_e4m3fn-text-enc"]}


def shrink(prompt: dict, size: int, steps: int) -> dict:
    for node in prompt.values():
        inputs = node["inputs"]
        for key in SIZE_INPUTS:
            if isinstance(inputs.get(key), int):
                inputs[key] = size
        if node["class_type"] == "KSampler":
            inputs["steps"] = steps
    return prompt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflow", required=True, type=Path)
    ap.add_argument("--size", type=int, default=None,
                    help="image width and height (default 256; PixArt 320, its smallest)")
    ap.add_argument("--steps", type=int, default=4, help="sampling steps (default 4)")
    ap.add_argument("--as-is", action="store_true", help="keep the workflow's own size and steps")
    ap.add_argument("--output", type=Path, default=Path("output"), help="where images are copied")
    args = ap.parse_args(argv)

    workflow = json.loads(args.workflow.read_text())
    base = Path(tempfile.mkdtemp(prefix="quantkit-run-"))
    family = args.workflow.name.split("_")[0]
    with ComfyServer(base, extra_args=SERVER_ARGS.get(family, [])) as server:
        print(f"ComfyUI {server.get('/system_stats')['system']['comfyui_version']} at {server.url} "
              f"(log: {server.log_path})")
        prompt = to_api(workflow, server.object_info())
        if not args.as_is:
            shrink(prompt, args.size or (320 if family == "pixart" else 256), args.steps)
        start = time.time()
        entry = server.run(prompt, timeout=3600)
        print(f"ran {args.workflow.name} in {time.time() - start:.1f} s")
        args.output.mkdir(parents=True, exist_ok=True)
        for node_id, out in entry["outputs"].items():
            for text in out.get("text", []):
                print(f"\n--- {prompt[node_id]['class_type']} (node {node_id}) ---\n{text}")
            for image in out.get("images", []):
                src = base / "output" / image.get("subfolder", "") / image["filename"]
                dst = args.output / image["filename"]
                shutil.copyfile(src, dst)
                print(f"saved {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
