"""Draws each bundled workflow's graph (its nodes where the file places them, its links)
as workflows/<name>.jpg: the thumbnail ComfyUI's Templates browser shows beside it.
Run after changing a workflow: python3 .ci/workflow_thumbnails.py (needs Pillow)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
SIZE = (512, 288)
PACK_PREFIX = "QuantKit"
COLOURS = {"pack": (214, 122, 38), "core": (70, 86, 110), "link": (150, 160, 175), "text": (236, 236, 236),
           "background": (32, 34, 40)}


def _font(size: int):
    for name in ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
                 "/usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf"):
        if Path(name).exists():
            return ImageFont.truetype(name, size)
    return ImageFont.load_default()


NOTE_TYPE = "MarkdownNote"  # the workflow's title and description (tests/harness/workflow_builder.py)


def title_of(workflow: dict, name: str) -> str:
    notes = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == NOTE_TYPE]
    if not notes or not notes[0].startswith("## "):
        raise SystemExit(f"{name} has no '## title' note: regenerate it (python tests/harness/build_workflows.py)")
    return notes[0].splitlines()[0].removeprefix("## ")


def draw(workflow: dict, title: str) -> Image.Image:
    nodes = {n["id"]: n for n in workflow["nodes"] if n["type"] != NOTE_TYPE}  # the graph only
    left = min(n["pos"][0] for n in nodes.values())
    top = min(n["pos"][1] for n in nodes.values())
    right = max(n["pos"][0] + n["size"][0] for n in nodes.values())
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes.values())
    margin, header = 16, 44
    scale = min((SIZE[0] - 2 * margin) / (right - left), (SIZE[1] - header - margin) / (bottom - top))

    def box(n):
        x0 = margin + (n["pos"][0] - left) * scale
        y0 = header + (n["pos"][1] - top) * scale
        return x0, y0, x0 + n["size"][0] * scale, y0 + n["size"][1] * scale

    image = Image.new("RGB", SIZE, COLOURS["background"])
    pen = ImageDraw.Draw(image)
    pen.text((margin, 12), title, font=_font(20), fill=COLOURS["text"])
    for _, source, _, target, _, _ in workflow["links"]:
        a, b = box(nodes[source]), box(nodes[target])
        pen.line([(a[2], (a[1] + a[3]) / 2), (b[0], (b[1] + b[3]) / 2)], fill=COLOURS["link"], width=2)
    label_font = _font(max(9, int(11 * min(1.0, scale * 2.5))))
    for n in nodes.values():
        ours = n["type"].startswith(PACK_PREFIX)
        x0, y0, x1, y1 = box(n)
        pen.rounded_rectangle((x0, y0, x1, y1), radius=4, fill=COLOURS["pack" if ours else "core"])
        label = n.get("title") or n["type"].removeprefix(PACK_PREFIX)
        pen.text((x0 + 4, y0 + 3), label[: max(4, int((x1 - x0) / 7))], font=label_font, fill=COLOURS["text"])
    return image


def main() -> int:
    for path in sorted(WORKFLOWS.glob("*.json")):
        workflow = json.loads(path.read_text())
        draw(workflow, title_of(workflow, path.name)).save(path.with_suffix(".jpg"), quality=85)
        print("wrote", path.with_suffix(".jpg").name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
