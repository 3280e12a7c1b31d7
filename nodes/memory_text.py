"""The Memory Report as text, from a MemorySnapshot."""
from __future__ import annotations

from typing import List

from ..backends.engine.report import QuantReport
from .memory_census import Component, MemorySnapshot

_BYTE_UNITS = ("KiB", "MiB", "GiB", "TiB")
_COUNT_UNITS = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))


def format_bytes(n: float) -> str:
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in _BYTE_UNITS:
        n /= 1024.0
        if abs(n) < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


def format_count(n: int) -> str:
    for scale, unit in _COUNT_UNITS:
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _by_size(figures: dict) -> str:
    ordered = sorted(figures.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{name} {format_bytes(b)}" for name, b in ordered) or "nothing"


def device_lines(snap: MemorySnapshot) -> List[str]:
    dev, gpu, ram = snap.devices, snap.devices.gpu, snap.devices.ram
    lines = []
    if gpu is None:
        lines.append(f"Device: {dev.name} (no GPU: RAM figures only)")
    else:
        lines.append(f"Device: {dev.name}")
        lines.append(f"VRAM: {format_bytes(gpu.total)} total, {format_bytes(gpu.free)} free")
        lines.append(f"Torch on {dev.device}: {format_bytes(gpu.allocated)} allocated, "
                     f"{format_bytes(gpu.reserved)} reserved; peak since last reset "
                     f"{format_bytes(gpu.peak_allocated)} allocated, "
                     f"{format_bytes(gpu.peak_reserved)} reserved")
    peak = "" if ram.peak_rss is None else f" (peak {format_bytes(ram.peak_rss)} since last reset)"
    lines.append(f"RAM: {format_bytes(ram.total)} total, {format_bytes(ram.available)} available; "
                 f"this process {format_bytes(ram.rss)} RSS{peak}")
    return lines


def quantkit_line(report: QuantReport) -> str:
    return (f"quantized by QuantKit: {report.target} -> {report.format_id} ({report.recipe} recipe): "
            f"{report.counts_text()}; {report.sizes_text(format_bytes)} "
            f"in {report.seconds:.2f} s on {report.device}")


def component_lines(c: Component, has_gpu: bool) -> List[str]:
    cen = c.census
    status = f"loaded by ComfyUI for {c.loaded_on}" if c.loaded_on else "not loaded by ComfyUI"
    title = f"[{c.name}] {c.model_class}" if c.wired else f"[loaded] {c.model_class}"
    saving = cen.saving_vs_16bit
    share = f" ({100.0 * saving / cen.bytes_at_16bit:.1f}%)" if cen.bytes_at_16bit else ""
    verb = "saves" if saving >= 0 else "costs"
    lines = [f"{title} - {status}",
             f"  {format_count(cen.parameters)} parameters, {format_bytes(cen.stored_bytes)} stored; "
             f"at 16 bits {format_bytes(cen.bytes_at_16bit)}: {verb} {format_bytes(abs(saving))}{share}",
             f"  formats: {_by_size(cen.bytes_by_format)}"]
    if has_gpu and c.dynamic:
        lines.append(f"  Dynamic VRAM: weights kept in RAM ({_by_size(cen.bytes_by_device)}); "
                     f"ComfyUI has {format_bytes(c.loaded_bytes)} of them staged on the GPU")
    elif has_gpu:
        lines.append(f"  on GPU {format_bytes(cen.gpu_bytes)}, offloaded to RAM "
                     f"{format_bytes(cen.offloaded_bytes)} (by device: {_by_size(cen.bytes_by_device)})")
    else:
        lines.append(f"  by device: {_by_size(cen.bytes_by_device)}")
    for r in c.quantkit_reports:
        lines.append(f"  {quantkit_line(r)}")
        lines += [f"    {note}" for note in r.notes]
    return lines


def report_text(snap: MemorySnapshot, peaks_reset: bool = False) -> str:
    lines = [f"Memory Report - {snap.label}" if snap.label else "Memory Report"]
    lines += device_lines(snap)
    lines.append("")
    if snap.components:
        shared = (f" ({format_bytes(snap.shared_bytes)} shared between them, counted once)"
                  if snap.shared_bytes else "")
        lines.append(f"Models: {format_bytes(snap.total_model_bytes)} in all{shared}")
        for c in snap.components:
            lines += component_lines(c, snap.devices.gpu is not None)
    else:
        lines.append("Models: none wired, none loaded by ComfyUI")
    if snap.inputs:
        lines.append("Inputs:")
        lines += [f"  {t.name}: {list(t.shape)} {t.format} on {t.device}, {format_bytes(t.nbytes)}"
                  for t in snap.inputs]
    if peaks_reset:
        lines.append("Peak counters were reset after this reading.")
    return "\n".join(lines)
