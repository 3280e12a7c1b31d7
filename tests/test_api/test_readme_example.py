"""The README's diffusers example, run as written (a separate Python, the pack's folder on
PYTHONPATH) on a tiny SD3 pipeline saved with save_pretrained: the example reads its model
from QUANTKIT_EXAMPLE_MODEL, which the README's readers leave unset (the hub id)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from harness import tiny_diffusers as tiny
from harness.locations import REPO_ROOT

SECTION = "## Use it outside ComfyUI (diffusers)"


def readme_example() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    assert SECTION in readme, f"README lacks the section '{SECTION}'"
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"README's '{SECTION}' has no ```python block"
    return blocks[0]


def test_the_readme_diffusers_example_runs(tmp_path):
    """Shown able to fail: the README example's format written "gguf:Q4_KK" -> the
    subprocess exits 1 with "Backend 'gguf' has no format 'Q4_KK'"; the CLIP_G_SLOT test
    removed from backends/api/pipeline.py -> "text_encoder_2: gguf:Q4_K" is printed."""
    code = readme_example()
    assert "stabilityai/stable-diffusion-3.5-medium" in code, "readers see the real hub id"
    model = tmp_path / "tiny-sd3"
    tiny.sd3_pipeline().save_pretrained(model)
    env = {**os.environ, "QUANTKIT_EXAMPLE_MODEL": str(model), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout
    print(printed)
    for line in ("transformer: gguf:Q4_K (sd3 recipe)", "text_encoder: gguf:Q4_K (clip recipe)",
                 "text_encoder_3: gguf:Q4_K (t5 recipe)"):
        assert line in printed, printed
    assert "text_encoder_2:" not in printed, "CLIP-G is kept by default"
    from PIL import Image
    with Image.open(tmp_path / "cat.png") as image:
        assert image.size == (32, 32)
        assert len(set(image.convert("L").getdata())) > 1, "a picture, not a blank"
