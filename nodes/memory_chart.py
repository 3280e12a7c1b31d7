"""The Memory Report as a chart (Pillow): per model, its size at 16 bits and now, the latter
stacked by storage format, with the GPU's total memory as a line when there is a GPU."""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .memory_census import MemorySnapshot
from .memory_text import format_bytes

CHART_WIDTH, CHART_HEIGHT = 1024, 640
MARGIN = 24
LABEL_COLUMN = 200  # component names, left of the bars
VALUE_COLUMN = 110  # byte figures, right of the longest bar
MAX_BAR_HEIGHT = 26

BACKGROUND = (255, 255, 255)
INK = (33, 33, 33)
MUTED_INK = (110, 110, 110)
GRID = (228, 228, 228)
REFERENCE_BAR = (200, 200, 200)
GPU_LINE = (200, 30, 30)
DTYPE_COLORS = {"fp32": (78, 121, 167), "bf16": (242, 142, 43), "fp16": (237, 201, 72),
                "fp8_e4m3fn": (176, 122, 161), "fp8_e5m2": (255, 157, 167)}
PALETTE = [(89, 161, 79), (118, 183, 178), (156, 117, 95), (225, 87, 89), (186, 176, 172),
           (31, 119, 180), (148, 103, 189), (140, 86, 75), (23, 190, 207), (188, 189, 34)]
REFERENCE_NAME = "at 16 bits"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def format_colors(snap: MemorySnapshot) -> Dict[str, Tuple[int, int, int]]:
    totals: Dict[str, int] = {}
    for c in snap.components:
        for fmt, b in c.census.bytes_by_format.items():
            totals[fmt] = totals.get(fmt, 0) + b
    colors, free = {}, iter(PALETTE * (1 + len(totals) // len(PALETTE)))
    for fmt in sorted(totals, key=lambda f: -totals[f]):
        colors[fmt] = DTYPE_COLORS.get(fmt) or next(free)
    return colors


def axis_ticks(max_bytes: float) -> Tuple[List[float], int, str]:
    """(tick values in bytes, unit size, unit name): about five round steps."""
    units = [(1, "B"), (1024, "KiB"), (1024 ** 2, "MiB"), (1024 ** 3, "GiB"), (1024 ** 4, "TiB")]
    unit, name = next(((u, n) for u, n in reversed(units) if max_bytes >= u), units[0])
    raw = max_bytes / unit / 5
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    step = next(m * magnitude for m in (1, 2, 5, 10) if raw <= m * magnitude)
    count = int(max_bytes / unit / step) + 1
    return [i * step * unit for i in range(count + 1) if i * step * unit <= max_bytes], unit, name


def _subtitle(snap: MemorySnapshot) -> str:
    dev, gpu, ram = snap.devices, snap.devices.gpu, snap.devices.ram
    if gpu is None:
        return (f"{dev.name}  |  RAM {format_bytes(ram.total)}, {format_bytes(ram.available)} "
                f"available  |  process {format_bytes(ram.rss)}")
    return (f"{dev.name}  |  GPU {format_bytes(gpu.total)}, {format_bytes(gpu.free)} free  |  "
            f"peak allocated {format_bytes(gpu.peak_allocated)}")


def _dashed_vline(draw, x, top, bottom, color, dash=6):
    for y in range(int(top), int(bottom), dash * 2):
        draw.line([(x, y), (x, min(y + dash, bottom))], fill=color, width=2)


def _legend(draw, colors, top, font) -> int:
    x, y = MARGIN, top
    entries = [(REFERENCE_NAME, REFERENCE_BAR)] + list(colors.items())
    for name, color in entries:
        width = 18 + draw.textlength(name, font=font) + 18
        if x + width > CHART_WIDTH - MARGIN:
            x, y = MARGIN, y + 20
        draw.rectangle([x, y + 2, x + 12, y + 14], fill=color)
        draw.text((x + 18, y), name, fill=INK, font=font)
        x += width
    return y + 24


class _Plot:
    """The bar area: maps bytes to x."""

    def __init__(self, top, bottom, scale_max):
        self.top, self.bottom = top, bottom
        self.left, self.right = MARGIN + LABEL_COLUMN, CHART_WIDTH - MARGIN - VALUE_COLUMN
        self.scale_max = scale_max

    def x_of(self, nbytes):
        return self.left + (self.right - self.left) * nbytes / self.scale_max


def _draw_axis(draw, plot, font):
    ticks, unit, unit_name = axis_ticks(plot.scale_max)
    for t in ticks:
        x = plot.x_of(t)
        draw.line([(x, plot.top), (x, plot.bottom)], fill=GRID, width=1)
        label = f"{t / unit:g} {unit_name}" if t else "0"
        draw.text((x - draw.textlength(label, font=font) / 2, plot.bottom + 4), label,
                  fill=MUTED_INK, font=font)


def _draw_component(draw, plot, c, y0, bar, colors, font, small):
    draw.text((MARGIN, y0), c.name if c.wired else "loaded", fill=INK, font=font)
    draw.text((MARGIN, y0 + 18), c.model_class[:26], fill=MUTED_INK, font=small)
    ref_y, now_y = y0, y0 + bar + 6
    for tag, y in (("16-bit", ref_y), ("now", now_y)):
        draw.text((plot.left - 8 - draw.textlength(tag, font=small), y + bar / 2 - 7), tag,
                  fill=MUTED_INK, font=small)
    draw.rectangle([plot.left, ref_y, max(plot.x_of(c.census.bytes_at_16bit), plot.left + 1),
                    ref_y + bar], fill=REFERENCE_BAR)
    x = plot.left
    for fmt, b in sorted(c.census.bytes_by_format.items(), key=lambda kv: -kv[1]):
        x_end = x + plot.x_of(b) - plot.left
        draw.rectangle([x, now_y, max(x_end, x + 1), now_y + bar], fill=colors[fmt])
        x = x_end
    for value, y in ((c.census.bytes_at_16bit, ref_y), (c.census.stored_bytes, now_y)):
        draw.text((plot.x_of(value) + 6, y + bar / 2 - 7), format_bytes(value), fill=INK, font=small)


def _draw_gpu_line(draw, plot, gpu_total, font):
    x = plot.x_of(gpu_total)
    _dashed_vline(draw, x, plot.top, plot.bottom, GPU_LINE)
    label = f"VRAM {format_bytes(gpu_total)}"
    draw.text((min(x + 4, CHART_WIDTH - MARGIN - draw.textlength(label, font=font)), plot.top + 2),
              label, fill=GPU_LINE, font=font)


def draw_chart(snap: MemorySnapshot) -> Image.Image:
    img = Image.new("RGB", (CHART_WIDTH, CHART_HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(img)
    title_font, font, small = _font(22), _font(14), _font(12)
    title = f"Memory Report - {snap.label}" if snap.label else "Memory Report"
    draw.text((MARGIN, 14), title, fill=INK, font=title_font)
    draw.text((MARGIN, 44), _subtitle(snap), fill=MUTED_INK, font=font)
    if not snap.components:
        message = "No model wired, none loaded by ComfyUI"
        draw.text(((CHART_WIDTH - draw.textlength(message, font=font)) / 2, CHART_HEIGHT / 2),
                  message, fill=MUTED_INK, font=font)
        return img

    colors = format_colors(snap)
    top = _legend(draw, colors, 70, small) + 8
    gpu_total = snap.devices.gpu.total if snap.devices.gpu is not None else 0
    biggest = max(max(c.census.bytes_at_16bit, c.census.stored_bytes) for c in snap.components)
    plot = _Plot(top, CHART_HEIGHT - MARGIN - 20, max(biggest, gpu_total, 1) * 1.05)
    _draw_axis(draw, plot, small)
    row = (plot.bottom - plot.top) / len(snap.components)
    bar = max(4, min(MAX_BAR_HEIGHT, row * 0.32))
    for i, c in enumerate(snap.components):
        y0 = plot.top + i * row + (row - 2 * bar - 6) / 2
        _draw_component(draw, plot, c, y0, bar, colors, font, small)
    if gpu_total:
        _draw_gpu_line(draw, plot, gpu_total, small)
    draw.line([(plot.left, plot.top), (plot.left, plot.bottom)], fill=INK, width=1)
    return img


def chart_tensor(img: Image.Image) -> torch.Tensor:
    """A ComfyUI IMAGE: float [1, H, W, 3] in 0..1."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).unsqueeze(0)
