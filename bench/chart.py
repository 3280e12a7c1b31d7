"""One PNG: per denoiser, step time relative to bf16 (bar) for every format that ran,
annotated with weight GiB and relative error. Pillow only (always installed with ComfyUI)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

GIB = 2 ** 30
COLOURS = {"bf16": (90, 90, 90), "fp16": (140, 140, 140), "comfy": (200, 120, 40), "torchao": (50, 110, 190),
           "bnb": (150, 70, 160), "quanto": (40, 150, 120), "gguf": (200, 60, 60)}
ROW, PANEL_W, LABEL_W, NOTE_W, TOP = 17, 640, 130, 170, 46


def _font(size: int):
    for name in ("DejaVuSans.ttf", "LiberationSans-Regular.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _panels(records):
    out = {}
    for r in records:
        if r["part"] != "denoiser" or not r.get("step"):
            continue
        out.setdefault(r.get("label", r["model"]), []).append(r)
    return out


def draw(merged, path: Path, title: str) -> Path:
    panels = _panels(merged["records"])
    if not panels:
        raise ValueError("no denoiser timings to draw")
    rows = max(len(v) for v in panels.values())
    cols = 2 if len(panels) > 1 else 1
    grid_rows = (len(panels) + cols - 1) // cols
    panel_h = TOP + rows * ROW + 24
    img = Image.new("RGB", (cols * PANEL_W + 20, grid_rows * panel_h + 50), "white")
    d = ImageDraw.Draw(img)
    big, small = _font(15), _font(11)
    d.text((12, 10), title, fill="black", font=big)
    for i, (label, recs) in enumerate(panels.items()):
        x0, y0 = 10 + (i % cols) * PANEL_W, 40 + (i // cols) * panel_h
        base = next((r["step"]["median_s"] for r in recs if r["format"] == "bf16"), None)
        if not base:
            continue
        ratios = [r["step"]["median_s"] / base for r in recs]
        scale = (PANEL_W - LABEL_W - NOTE_W - 20) / max(max(ratios), 1.0)
        d.text((x0, y0), f"{label}: step time / bf16 ({base * 1000:.1f} ms), batch 2", fill="black", font=small)
        one = x0 + LABEL_W + scale
        d.line([(one, y0 + 18), (one, y0 + TOP - 8 + rows * ROW)], fill=(180, 180, 180))
        for j, (r, ratio) in enumerate(zip(recs, ratios)):
            y = y0 + TOP - 20 + j * ROW
            backend = r["format"].split(":")[0]
            d.text((x0, y), r["format"], fill="black", font=small)
            d.rectangle([x0 + LABEL_W, y + 2, x0 + LABEL_W + ratio * scale, y + ROW - 4],
                        fill=COLOURS.get(backend, (100, 100, 100)))
            err = ((r.get("rel_err") or {}).get("normal") or {}).get("fp32")
            note = f"{ratio:.2f}x  {r.get('weight_bytes', 0) / GIB:.2f} GiB"
            if err is not None:
                note += f"  err {err * 100:.1f}%"
            d.text((x0 + LABEL_W + ratio * scale + 4, y), note, fill=(40, 40, 40), font=small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
    return path
